"""The contract transformers checks for its own models, checked for PNet-LLaMA on the installed transformers.

Two configurations, each trained a few steps so that routing is not uniform: the official release's (down_proj only,
8 experts, one router per projection) and gate+up+down with one shared router and 4 experts.
"""

import copy
import importlib
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaModel

from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM
from modeling_pnet_llama.modeling_pnet_llama import ExpertLinear, TopOneRouter
from pnet.upcycle import upcycle_llama

# The cache keyword of this transformers release (`cache` from 5.24 on, `past_key_values` before): tests speak to
# transformers in its own terms, the model code never names it.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "down-e8": dict(num_experts=8, moe_projections=["down"]),
    "shared-gate-up-down-e4": dict(num_experts=4, moe_projections=["gate", "up", "down"], shared_router=True),
}
VOCAB = BASE["vocab_size"]


def affine_sequences(num: int, length: int, seed: int) -> torch.Tensor:
    """Token sequences x_{t+1} = (a x_t + b) mod (V - 3) + 3 with per-sequence a, b: learnable structure."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(2, 9, (num, 1), generator=generator)
    b = torch.randint(0, VOCAB - 3, (num, 1), generator=generator)
    tokens = [torch.randint(0, VOCAB - 3, (num, 1), generator=generator)]
    for _ in range(length - 1):
        tokens.append((a * tokens[-1] + b) % (VOCAB - 3))
    return torch.cat(tokens, dim=1) + 3  # 0-2 are pad/bos/eos


@pytest.fixture(scope="module", params=list(CONFIGS))
def trained(request) -> PNetLlamaForCausalLM:
    """A tiny PNet-LLaMA after 40 AdamW steps: routing no longer uniform, generations not one repeated token."""
    torch.manual_seed(0)
    model = PNetLlamaForCausalLM(PNetLlamaConfig(**BASE, **CONFIGS[request.param])).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = affine_sequences(16, 24, seed=1)
    for _ in range(40):
        loss = model(data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat(model(data, output_router_logits=True).router_logits)
    # Routing is decided, not uniform: the top-1 probability is well above 1/E; and tokens use several experts.
    top_prob = torch.softmax(logits, dim=-1).max(-1).values.mean().item()
    used = (torch.bincount(logits.argmax(-1), minlength=model.config.num_experts) > 0).sum().item()
    assert top_prob > 1.4 / model.config.num_experts and used >= 3, (top_prob, used)
    return model


def prompts(batch: int = 2, length: int = 6, seed: int = 5) -> torch.Tensor:
    return affine_sequences(batch, length, seed)


def greedy(model, input_ids, new_tokens=8, **kwargs):
    # min_new_tokens: every call runs the full length, so equal lengths compare equal work.
    return model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------------


def test_greedy_with_cache_equals_without_and_is_not_degenerate(trained):
    prompt = prompts()
    with_cache = greedy(trained, prompt, use_cache=True)
    assert with_cache.shape == (2, 14)
    assert torch.equal(with_cache, greedy(trained, prompt, use_cache=False))
    assert all(len(set(row[6:].tolist())) > 2 for row in with_cache)  # not one token repeated
    single = greedy(trained, prompt[:1], use_cache=True)  # batch 1 decodes through the single-token path
    assert torch.equal(single, greedy(trained, prompt[:1], use_cache=False))


def test_cached_decoding_logits_equal_full_forward(trained):
    prompt = prompts()
    out = greedy(trained, prompt, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert len(out.scores) == len(out.logits) == 8 and out.logits[0].shape == (2, VOCAB)
    with torch.no_grad():
        full = trained(out.sequences).logits  # one forward over the whole sequence, no cache
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, full[:, 5 + step], rtol=1e-4, atol=1e-4)
        assert torch.equal(step_logits.argmax(-1), out.sequences[:, 6 + step])


def test_sampling_with_cache_equals_without(trained):
    prompt = prompts()
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(3)
    with_cache = trained.generate(prompt, use_cache=True, **kwargs)
    torch.manual_seed(3)
    without_cache = trained.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)
    torch.manual_seed(4)
    assert not torch.equal(trained.generate(prompt, **kwargs), with_cache)  # it does sample


def test_beam_search_with_cache_equals_without(trained):
    prompt = prompts()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False)
    with_cache = trained.generate(prompt, use_cache=True, **kwargs)
    assert with_cache.shape == (2, 12)
    assert torch.equal(with_cache, trained.generate(prompt, use_cache=False, **kwargs))


def test_assisted_decoding_equals_greedy(trained):
    torch.manual_seed(7)  # an untrained assistant: many of its drafts are rejected, so both paths of the check run
    assistant = PNetLlamaForCausalLM(PNetLlamaConfig(**{**BASE, "num_hidden_layers": 1}, num_experts=2)).eval()
    prompt = prompts(batch=1)
    assert torch.equal(greedy(trained, prompt, assistant_model=assistant), greedy(trained, prompt))


def test_continuing_from_the_returned_cache_equals_one_long_generate(trained):
    prompt = prompts()
    first = greedy(trained, prompt, new_tokens=4, return_dict_in_generate=True)
    cache = getattr(first, CACHE_KWARG)
    assert cache is not None and cache.get_seq_length() == 6 + 4 - 1  # the last token is not yet in the cache
    continued = greedy(trained, first.sequences, new_tokens=4, **{CACHE_KWARG: cache})
    assert torch.equal(continued, greedy(trained, prompt, new_tokens=8))


def test_generate_from_inputs_embeds(trained):
    prompt = prompts()
    embeds = trained.get_input_embeddings()(prompt)
    from_embeds = greedy(trained, None, inputs_embeds=embeds)
    assert from_embeds.shape == (2, 8)  # only the new tokens
    assert torch.equal(from_embeds, greedy(trained, prompt)[:, 6:])


def test_left_padded_batch_equals_each_prompt_alone(trained):
    short, long = prompts(1, 4, seed=8)[0], prompts(1, 9, seed=9)[0]
    batch = torch.zeros(2, 9, dtype=torch.long)  # pad_token_id 0 on the left
    batch[0, 5:], batch[1] = short, long
    attention_mask = (batch != 0).long()
    padded = greedy(trained, batch, attention_mask=attention_mask, pad_token_id=0)
    assert torch.equal(padded[0, 5:], greedy(trained, short[None])[0])
    assert torch.equal(padded[1], greedy(trained, long[None])[0])


@pytest.mark.parametrize("batch", [1, 2])
def test_static_cache_equals_dynamic(trained, batch):
    prompt = prompts(batch)
    static = greedy(trained, prompt, cache_implementation="static")
    assert torch.equal(static, greedy(trained, prompt))


# ----------------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------------


def loss_and_gradients(model, data):
    model.zero_grad()
    out = model(data, labels=data)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def enable_checkpointing(model, use_reentrant: bool) -> None:
    # transformers 5.24 renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def test_gradient_checkpointing_equals_plain_backward_and_reaches_every_router_and_expert(trained):
    model = copy.deepcopy(trained).train()
    data = affine_sequences(8, 32, seed=11)
    loss, grads = loss_and_gradients(model, data)
    enable_checkpointing(model, use_reentrant=False)
    checkpointed_loss, checkpointed_grads = loss_and_gradients(model, data)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    for name, module in model.named_modules():
        if isinstance(module, TopOneRouter):
            assert grads[f"{name}.weight"].abs().sum() > 0, name
        if isinstance(module, ExpertLinear):  # every expert's slice of the 3-D weight
            per_expert = grads[f"{name}.weight"].abs().sum(dim=(1, 2))
            assert (per_expert > 0).all(), (name, per_expert)


def test_reentrant_checkpointing_trains_every_router(trained):
    """Reentrant checkpointing (issue 19: it used to be refused) trains: every router gets a gradient, through the task
    loss (exact gradients: tests/test_transformers_conformance.py)."""
    model = copy.deepcopy(trained).train()
    enable_checkpointing(model, use_reentrant=True)
    data = affine_sequences(2, 8, seed=11)
    model(data, labels=data).loss.backward()
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if "router" in name)


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile, torch.export
# ----------------------------------------------------------------------------------------------------------------------


def routing_decisions(router_logits: tuple[torch.Tensor, ...], batch: int) -> torch.Tensor:
    """(batch, routers * seq_len) chosen experts."""
    return torch.stack([logits.argmax(-1).reshape(batch, -1) for logits in router_logits], dim=1).flatten(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compile_fullgraph_forward_and_training_step(trained, dtype):
    """Compiled equals eager: the forward (logits, routing, loss) and the gradients of one training step. In bf16 a
    token whose two best experts are within rounding of each other may pick another expert in the compiled graph
    (fused kernels round differently) and change the logits of its sequence: there, the sequences whose routing
    agrees everywhere must match, and routing must agree almost everywhere.

    One compiled graph per case (train mode, with gradients): the model has no dropout and no jitter here, so its
    forward is the eval forward, and the model code takes the same compiled path with and without gradients
    (`torch.compiler.is_compiling()`). A separate no-grad graph doubled the compile time (the suite's largest cost
    on 2 CPU cores) without reaching other model code."""
    torch._dynamo.reset()
    model = copy.deepcopy(trained).to(dtype).train()
    data = affine_sequences(8, 16, seed=12)
    compiled = torch.compile(model, fullgraph=True)
    model.zero_grad()
    eager = model(data, labels=data, output_router_logits=True)
    eager.loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    fused = compiled(data, labels=data, output_router_logits=True)
    fused.loss.backward()  # same parameters: read the gradients off `model`
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    same_routing = routing_decisions(eager.router_logits, 8) == routing_decisions(fused.router_logits, 8)
    agree = same_routing.all(dim=1)
    if dtype == torch.float32:
        assert agree.all()
    assert same_routing.float().mean() > 0.97 and agree.sum() >= 4, same_routing.float().mean(dim=1)
    # bf16: fused kernels round differently; a dense LLaMA trained the same way differs by up to 1.3% of its largest
    # logit between eager and compiled bf16 (0.145 of 10.9).
    eager_logits, fused_logits = eager.logits.detach(), fused.logits.detach()
    scale = eager_logits.abs().max().item()
    atol = 1e-4 * scale if dtype == torch.float32 else 0.03 * scale
    torch.testing.assert_close(fused_logits[agree], eager_logits[agree], rtol=0, atol=atol)
    torch.testing.assert_close(fused.loss.detach(), eager.loss.detach(),
                               rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=0)
    for name, grad in eager_grads.items():
        if ".mlp." in name:  # routers and experts
            cosine = torch.nn.functional.cosine_similarity(compiled_grads[name].flatten().float(),
                                                           grad.flatten().float(), dim=0)
            assert cosine > (0.9999 if dtype == torch.float32 else 0.95), (name, cosine)


def test_export_fp32(trained):
    data = affine_sequences(2, 12, seed=13)
    exported = torch.export.export(trained, (data,), kwargs={"use_cache": False})
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(data, use_cache=False).logits, trained(data).logits,
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# save / load, attention implementations, outputs
# ----------------------------------------------------------------------------------------------------------------------


def test_save_and_fresh_process_load_with_remote_code(trained, tmp_path):
    trained.save_pretrained(tmp_path / "ckpt")
    assert {"model.safetensors", "modeling_pnet_llama.py", "configuration_pnet_llama.py"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()
    }
    # Every head is listed, not only the class that was saved (a causal LM folder fine-tunes as a classifier).
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_pnet_llama.PNetLlamaConfig",
        "AutoModel": "modeling_pnet_llama.PNetLlamaModel",
        "AutoModelForCausalLM": "modeling_pnet_llama.PNetLlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_pnet_llama.PNetLlamaForSequenceClassification",
    }
    data = prompts()
    torch.save({"input_ids": data, "logits": trained(data).logits.detach()}, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        # Same thread count as this process (conftest sets it; OMP_NUM_THREADS may differ): bit-identical matmuls.
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()\n"
        "assert 'modeling_pnet_llama' not in sys.modules, 'the installed package must not be needed'\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)\n"
        "logits = model(expected['input_ids']).logits\n"
        "print(type(model).__name__, (logits - expected['logits']).abs().max().item())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FutureWarning" not in result.stderr, result.stderr[-3000:]
    name, max_diff = result.stdout.split()[-2:]
    assert name == "PNetLlamaForCausalLM" and float(max_diff) == 0.0


def test_sdpa_eager_and_flex_attention_are_equivalent(trained):
    model = copy.deepcopy(trained)
    data = prompts(2, 10)
    attention_mask = torch.ones_like(data)
    attention_mask[0, :3] = 0  # left padding
    logits = {}
    for implementation in ("sdpa", "eager", "flex_attention"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():  # flex attention has no CPU backward
            logits[implementation] = model(data, attention_mask=attention_mask).logits
    for implementation in ("eager", "flex_attention"):
        torch.testing.assert_close(logits[implementation][0, 3:], logits["sdpa"][0, 3:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[implementation][1], logits["sdpa"][1], rtol=1e-5, atol=1e-5)


def test_hidden_states_attentions_and_router_logits(trained):
    model = copy.deepcopy(trained)
    model.set_attn_implementation("eager")
    data = prompts(2, 7)
    with torch.no_grad():
        out = model(data, output_hidden_states=True, output_attentions=True, output_router_logits=True)
        plain = model(data)
    layers, config = model.config.num_hidden_layers, model.config
    assert len(out.hidden_states) == layers + 1 and all(h.shape == (2, 7, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(data))
    assert len(out.attentions) == layers and all(a.shape == (2, 4, 7, 7) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 7))  # rows of attention weights
    routers = layers * (1 if config.shared_router else len(config.moe_projections))
    assert len(out.router_logits) == routers == len(model.model.router_names())
    assert all(r.shape == (14, config.num_experts) and r.dtype == torch.float32 for r in out.router_logits)
    assert plain.hidden_states is None and plain.attentions is None and plain.router_logits is None
    torch.testing.assert_close(plain.logits, out.logits)


def test_missing_router_refuses_but_missing_plain_weight_gets_the_usual_report(trained, tmp_path):
    trained.save_pretrained(tmp_path / "ok")
    weights = load_file(tmp_path / "ok" / "model.safetensors")
    config = trained.config

    router_key = "model.layers.1.mlp." + ("router.weight" if config.shared_router else "down_router.weight")
    without_router = {k: v for k, v in weights.items() if k != router_key}
    trained.save_pretrained(tmp_path / "no-router")
    save_file(without_router, tmp_path / "no-router" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"refusing to random-initialise.*{router_key.replace('.', '[.]')}"):
        PNetLlamaForCausalLM.from_pretrained(tmp_path / "no-router")

    experts_key = "model.layers.0.mlp.down_proj.weight"
    without_experts = {k: v for k, v in weights.items() if k != experts_key}
    save_file(without_experts, tmp_path / "no-router" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"Missing: \['{experts_key}'\]"):
        PNetLlamaForCausalLM.from_pretrained(tmp_path / "no-router")

    if "up" not in config.moe_projections:  # a plain (not routed) projection: transformers' usual missing-key report
        plain_key = "model.layers.0.mlp.up_proj.weight"
        save_file({k: v for k, v in weights.items() if k != plain_key}, tmp_path / "no-router" / "model.safetensors",
                  metadata={"format": "pt"})
        model, info = PNetLlamaForCausalLM.from_pretrained(tmp_path / "no-router", output_loading_info=True)
        assert plain_key in info["missing_keys"] and isinstance(model, PNetLlamaForCausalLM)


# ----------------------------------------------------------------------------------------------------------------------
# transformers versions
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("package, module", [
    ("modeling_pnet_llama", "modeling_pnet_llama.configuration_pnet_llama"),
    ("modeling_parameternet", "modeling_parameternet.transformers_version"),
])
def test_supported_transformers_range_is_declared_once_and_enforced_at_import(repo_root, package, module):
    """Each package of model code checks the installed transformers at import against the range pyproject.toml
    declares; outside it (below the minimum, or the next major) importing raises, naming the release and the range."""
    requirement = importlib.import_module(module).TRANSFORMERS_REQUIREMENT
    assert f'"{requirement}",' in (repo_root / "pyproject.toml").read_text()
    major, minor = map(int, re.fullmatch(r"transformers>=(\d+)\.(\d+),<\d+", requirement).groups())
    for outside in (f"{major}.{minor - 1}.0", f"{major + 1}.0.0"):
        script = (
            "import importlib.metadata as metadata\n"
            "real = metadata.version\n"
            f"metadata.version = lambda name: {outside!r} if name == 'transformers' else real(name)\n"
            f"import {package}\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo_root,
                                timeout=120)
        assert result.returncode != 0
        assert requirement in result.stderr and f"transformers=={outside}" in result.stderr, result.stderr[-2000:]


def test_dense_llama_of_the_same_weights_matches_at_one_expert():
    """E = 1 with straight-through scaling is LLaMA: the inherited attention/cache path and ours agree exactly."""
    torch.manual_seed(14)
    dense = LlamaForCausalLM(LlamaConfig(**BASE)).eval()
    model = upcycle_llama(dense, num_experts=1, moe_projections=["gate", "up", "down"]).eval()
    prompt = prompts()
    assert torch.equal(greedy(model, prompt), greedy(dense, prompt))
    json.dumps(model.config.to_dict())  # serialisable
