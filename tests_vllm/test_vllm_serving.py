"""pnet's vLLM plugin: PNet-LLaMA folders served by vLLM give HF's greedy tokens, sample, serve over HTTP, classify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import (
    MAX_NEW_TOKENS,
    PROMPTS,
    SPECS,
    build_tiny_pnet,
    build_tiny_upcycled,
    hf_greedy,
    make_llm,
    shutdown,
)

from pnet.vllm_server import vllm_server

NATIVE_CLASS = "pnet.vllm_pnet_llama.PNetLlamaForCausalLM"


@pytest.fixture(scope="module", params=sorted(SPECS))
def engine(request, tiny_pnet_dirs):
    llm = make_llm(tiny_pnet_dirs[request.param])
    yield request.param, llm
    shutdown(llm)


def _greedy(llm, prompt_ids, **kwargs):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=0, **kwargs)
    return llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)


# --------------------------------------------------------------------------------------------- the references


@pytest.mark.parametrize("name", sorted(SPECS))
def test_references_are_not_degenerate(name, references, tiny_pnet_dirs):
    """The comparisons below can fail: HF's greedy text does not repeat a few tokens, and swapping two experts of one
    routed projection changes it (routing decides the output)."""
    from transformers import AutoModelForCausalLM

    ref = references[name]
    assert [len(t) for t in ref.tokens] == [MAX_NEW_TOKENS] * len(PROMPTS)
    assert min(len(set(t)) for t in ref.tokens) >= MAX_NEW_TOKENS // 2, ref.tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_pnet_dirs[name], dtype=torch.float32)
    routed = getattr(model.model.layers[0].mlp, f"{SPECS[name].moe_projections[0]}_proj")
    with torch.no_grad():
        routed.weight[[0, 1]] = routed.weight[[1, 0]].clone()
    swapped, _ = hf_greedy(tiny_pnet_dirs[name], ref.prompt_ids, model=model)
    assert swapped != ref.tokens


# --------------------------------------------------------------------------------------------- LLM(model=DIR)


def test_greedy_batch_matches_hf(engine, references):
    """All prompts (2 to ~40 tokens) in one batch: vLLM's greedy tokens equal HF generate's; log-probs agree."""
    name, llm = engine
    ref = references[name]
    outputs = _greedy(llm, ref.prompt_ids)
    assert llm.apply_model(lambda model: f"{type(model).__module__}.{type(model).__name__}") == [NATIVE_CLASS]
    assert [list(o.outputs[0].token_ids) for o in outputs] == ref.tokens
    for output, expected in zip(outputs, ref.logprobs):
        got = [next(iter(step.values())).logprob for step in output.outputs[0].logprobs]
        assert got == pytest.approx(expected, abs=2e-3)


def test_sampling(engine, references):
    """Seeded sampling: full-length outputs in the vocabulary, reproducible per seed, different across seeds and from
    greedy; n=3 gives three completions."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    name, llm = engine
    ref = references[name]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in ref.prompt_ids]

    def sample(seed, n=1):
        params = SamplingParams(
            temperature=1.0, top_p=0.9, top_k=50, seed=seed, n=n, max_tokens=MAX_NEW_TOKENS, ignore_eos=True
        )
        return [[list(c.token_ids) for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again
    assert first != other
    assert [runs[0] for runs in first] != ref.tokens
    vocab = llm.llm_engine.model_config.get_vocab_size()
    assert all(len(t) == MAX_NEW_TOKENS and all(0 <= i < vocab for i in t) for runs in first for t in runs)
    three = sample(3, n=3)
    assert all(len(runs) == 3 and len({tuple(t) for t in runs}) > 1 for runs in three)


def test_trust_remote_code_and_text_prompts(tiny_pnet_dirs, references):
    """trust_remote_code=True (the folder's config code) still runs pnet's native class; text prompts are tokenized by
    vLLM as by HF."""
    from vllm import SamplingParams

    name = "down_e8"
    llm = make_llm(tiny_pnet_dirs[name], trust_remote_code=True)
    try:
        assert llm.apply_model(lambda model: f"{type(model).__module__}.{type(model).__name__}") == [NATIVE_CLASS]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
        outputs = llm.generate(list(PROMPTS), params, use_tqdm=False)
    finally:
        shutdown(llm)
    assert [o.prompt_token_ids for o in outputs] == references[name].prompt_ids
    assert [list(o.outputs[0].token_ids) for o in outputs] == references[name].tokens


def test_capacity_factor_is_refused(tmp_path):
    """A checkpoint trained with an expert capacity gets a clear error before any weight is loaded."""
    path = tmp_path / "capacity"
    build_tiny_pnet(SPECS["down_e8"], path)
    config = json.loads((path / "config.json").read_text())
    config["expert_capacity_factor"] = 1.25
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="expert_capacity_factor=1.25"):
        make_llm(path)


def test_classifier_matches_hf(tmp_path):
    """PNetLlamaForSequenceClassification folders (e.g. the SST-2 fine-tune) classify in vLLM as in HF."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import TOKENIZER_DIR
    from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForSequenceClassification

    path = tmp_path / "classifier"
    torch.manual_seed(0)
    config = PNetLlamaConfig(
        vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, num_experts=4, moe_projections=["up", "down"],
        num_labels=2, pad_token_id=0,
    )  # fmt: skip
    PNetLlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.save_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        expected = [model(**tokenizer(p, return_tensors="pt")).logits[0].softmax(-1).tolist() for p in PROMPTS]
    assert max(abs(p[0] - p[1]) for p in expected) > 0.2  # the classes are told apart

    llm = make_llm(path, runner="pooling")
    try:
        got = [o.outputs.probs for o in llm.classify(list(PROMPTS), use_tqdm=False)]
    finally:
        shutdown(llm)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)


TENSOR_PARALLEL_SCRIPT = """
import json, sys
from conftest import make_llm, shutdown
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

if __name__ == "__main__":  # vLLM spawns its tensor-parallel workers, which re-import this script
    ref = json.loads(sys.argv[2])
    llm = make_llm(sys.argv[1], tensor_parallel_size=2)
    params = SamplingParams(temperature=0.0, max_tokens=len(ref["tokens"][0]), ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in ref["prompt_ids"]], params, use_tqdm=False)
    shutdown(llm)
    print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel CPU workers need two cores")
def test_tensor_parallel_2(tiny_pnet_dirs, references, tmp_path):
    """tensor_parallel_size=2 (attention sharded, FFN replicated on both ranks) gives HF's greedy tokens. Run in a
    fresh process: vLLM's CPU workers are bound one per core, which this process's other engines must not inherit."""
    name = "gate_up_down_shared_e4"
    ref = references[name]
    script = tmp_path / "tp2.py"
    script.write_text(TENSOR_PARALLEL_SCRIPT)
    pythonpath = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "PYTHONPATH": pythonpath}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    reference = json.dumps({"prompt_ids": ref.prompt_ids, "tokens": ref.tokens})
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_pnet_dirs[name]), reference],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("TOKENS ")]
    assert json.loads(line.removeprefix("TOKENS ")) == ref.tokens


# --------------------------------------------------------------------------------------------- vllm serve DIR


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def serving_tiny(model_dir: Path, log_path: Path, env: dict, extra_args: list[str] = ()):
    """`vllm serve model_dir` as "tiny", context length 512 (pnet.vllm_server); yields its base URL."""
    return vllm_server(model_dir, log_path, "tiny", ["--max-model-len", "512", *extra_args], env)


def _served_greedy(url: str, prompt: str) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    return _post(f"{url}/v1/completions", body)["choices"][0]["token_ids"]


@pytest.mark.parametrize(
    ("trust_remote_code", "inductor"), [(False, True), (True, False)], ids=["default", "trust_remote_code"]
)
def test_vllm_serve(trust_remote_code, inductor, tiny_pnet_dirs, references, tmp_path):
    """`vllm serve DIR` (once with vLLM's default CPU settings: engine in its own process, model compiled by inductor;
    once with --trust-remote-code): the OpenAI completions endpoint returns HF's greedy tokens."""
    name = "gate_up_down_shared_e4"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    if inductor:
        env.pop("VLLM_CPU_CI_ENV", None)
    extra_args = ["--trust-remote-code"] if trust_remote_code else []
    with serving_tiny(tiny_pnet_dirs[name], tmp_path / "serve.log", env, extra_args) as url:
        for prompt, expected in zip(PROMPTS[:3], references[name].tokens):
            assert _served_greedy(url, prompt) == expected


def test_vllm_serve_of_a_pnet_upcycle_folder(tmp_path):
    """What a user of a real LLaMA does (results/smollm2.md): `pnet-upcycle` a dense LLaMA with tied embeddings and
    grouped-query attention (SmolLM2's shape), then `vllm serve` the folder it wrote. The endpoint returns HF
    `generate`'s greedy tokens of that folder for every prompt. The experts are Drop-Upcycling-perturbed
    (gate+up+down, shared router, E=4), so routing decides the output: the upcycle's greedy text differs from the
    dense model's, and a wrong expert or a lost tie of the embeddings would show."""
    from transformers import AutoTokenizer

    dense, upcycled = build_tiny_upcycled(
        tmp_path, num_experts=4, projections=["gate", "up", "down"], shared_router=True, perturb_fraction=0.5
    )
    tokenizer = AutoTokenizer.from_pretrained(upcycled)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    expected, _ = hf_greedy(upcycled, prompt_ids)
    dense_tokens, _ = hf_greedy(dense, prompt_ids)
    assert expected != dense_tokens
    assert min(len(set(t)) for t in expected) >= MAX_NEW_TOKENS // 2, expected

    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with serving_tiny(upcycled, tmp_path / "serve.log", env) as url:
        served = [_served_greedy(url, prompt) for prompt in PROMPTS]
    assert served == expected


# --------------------------------------------------------------------------------------------- the routed matmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_routed_matmul_under_vllms_compilation(dtype):
    """The routed matmul the vLLM model shares with the HF model equals a per-token loop, with empty experts, on the
    grouped_mm path (fp32/bf16 eager), transformers' per-expert fallback (fp64) and the every-expert path (fp32/fp64
    compiled), traces with a dynamic token dimension, and runs as the vLLM custom op."""
    from modeling_pnet_llama.routed_linear import grouped_mm_takes, routed_matmul

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 64, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(6, 96, 64, generator=generator, dtype=torch.float64).to(dtype)
    expert_index = torch.randint(0, 4, (37,), generator=generator)  # experts 4 and 5 get no token
    expected = torch.stack([weight[e].double() @ hidden[t].double() for t, e in enumerate(expert_index.tolist())])
    assert grouped_mm_takes(hidden, weight) == (dtype != torch.float64)
    got = routed_matmul(hidden, weight, expert_index)
    assert got.dtype == dtype and got.shape == (37, 96)
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.double(), expected, atol=tolerance * expected.abs().max().item(), rtol=0)
    compiled = torch.compile(routed_matmul, fullgraph=True, dynamic=True, backend="eager")
    torch.testing.assert_close(compiled(hidden, weight, expert_index), got)
    from pnet import vllm_pnet_llama  # noqa: F401  (registers the op)

    torch.testing.assert_close(torch.ops.vllm.pnet_routed_matmul(hidden, weight, expert_index), got)


# --------------------------------------------------------------------------------------------- the plugin


def test_plugin_register_adds_the_architectures_to_vllms_registry():
    """`register()` (vLLM's `general_plugins` entry point) makes both PNet architectures known to vLLM's real
    registry, resolving to pnet's native classes, and is idempotent."""
    from vllm import ModelRegistry

    from pnet import vllm_plugin

    vllm_plugin.register()
    vllm_plugin.register()
    assert set(vllm_plugin.VLLM_MODEL_CLASSES) <= set(ModelRegistry.get_supported_archs())
    for architecture, target in vllm_plugin.VLLM_MODEL_CLASSES.items():
        registered = ModelRegistry.models[architecture]  # lazy: vLLM imports the module when it loads such a model
        assert f"{registered.module_name}:{registered.class_name}" == target
