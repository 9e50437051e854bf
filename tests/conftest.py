import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Offline data pack beside the repo (present on developer machines and in CI); tests that need more than
# the bundled samples use it.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data pack not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_pnet_dir(tmp_path_factory) -> Path:
    """A saved tiny PNet-LLaMA (up_proj routed over 4 experts, random weights) with the LLaMA tokenizer."""
    from transformers import AutoTokenizer

    from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM

    path = tmp_path_factory.mktemp("models") / "tiny-pnet"
    torch.manual_seed(0)
    config = PNetLlamaConfig(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        num_experts=4,
        moe_projections=["up"],
    )
    PNetLlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(REPO_ROOT / "data" / "tokenizer" / "llama").save_pretrained(path)
    return path


@pytest.fixture
def data_parallel_replica():
    """`replica(model)`: what `torch.nn.parallel.replicate` (nn.DataParallel) builds for one device, without devices
    or tensor copies: every module is `_replicate_for_data_parallel()`'s shallow copy, which shares the original's
    forward hooks, with its children and parameters relinked to the copies."""

    def replica(model: torch.nn.Module) -> torch.nn.Module:
        copies = {module: module._replicate_for_data_parallel() for module in model.modules()}
        for module, copy in copies.items():
            copy._modules = {name: copies.get(child) for name, child in module._modules.items()}
            copy._parameters = dict(module._parameters)
        return copies[model]

    return replica
