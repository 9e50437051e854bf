"""PNet-LLaMA: routing math, expert computation, losses, LLaMA equivalence, upcycling, save/load, generation."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import modeling_pnet_llama.routed_linear as routed_linear
from modeling_pnet_llama import (
    PNetLlamaConfig,
    PNetLlamaForCausalLM,
    PNetLlamaForSequenceClassification,
    PNetLlamaModel,
)
from modeling_pnet_llama.modeling_pnet_llama import ExpertLinear, PNetLlamaMLP, load_balancing_loss, router_z_loss

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_config(**overrides) -> PNetLlamaConfig:
    return PNetLlamaConfig(**{**TINY, **overrides})


def tiny_dense(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_experts", 0, "num_experts must be an integer >= 1, got 0"),
        ("num_experts", -3, "num_experts must be an integer >= 1, got -3"),
        ("num_experts", 2.5, "num_experts"),
        ("moe_projections", [], "moe_projections must be a non-empty list"),
        ("moe_projections", ["down", "ffn"], r"drawn from \['gate', 'up', 'down'\], got \['down', 'ffn'\]"),
        ("moe_projections", ["up", "up"], "distinct"),
        ("expert_capacity_factor", 0.0, "expert_capacity_factor must be None .* or a number > 0, got 0.0"),
        ("expert_capacity_factor", -1.5, "got -1.5"),
        ("router_aux_loss_coef", -0.01, "router_aux_loss_coef must be a finite number >= 0, got -0.01"),
        ("router_z_loss_coef", -1e-3, "router_z_loss_coef must be a finite number >= 0"),
        ("router_jitter_noise", 1.0, r"router_jitter_noise must lie in \[0, 1\), got 1.0"),
        ("router_jitter_noise", -0.1, "router_jitter_noise"),
        ("expert_output_scaling", "softmax", "expert_output_scaling must be one of"),
    ],
)
def test_invalid_config_raises_value_error(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_config_roundtrip_and_canonical_projection_order():
    config = tiny_config(moe_projections=["down", "gate"], num_experts=3, expert_capacity_factor=1.25)
    assert config.model_type == "pnet_llama"
    assert config.moe_projections == ["gate", "down"]
    reloaded = PNetLlamaConfig(**config.to_dict())
    assert (reloaded.moe_projections, reloaded.num_experts, reloaded.expert_capacity_factor) == (
        ["gate", "down"],
        3,
        1.25,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Experts: grouped path vs a per-expert reference
# ----------------------------------------------------------------------------------------------------------------------


def reference_expert_linear(weight, hidden_states, expert_index, expert_scale):
    """Token by token: y_t = scale_t * W[e_t] x_t."""
    rows = [weight[e] @ x * s for x, e, s in zip(hidden_states, expert_index.tolist(), expert_scale)]
    return torch.stack(rows)


@pytest.mark.parametrize("out_features, use_grouped_mm", [(8, True), (7, False), (8, False)])
def test_expert_linear_matches_reference_values_and_gradients(monkeypatch, out_features, use_grouped_mm):
    torch.manual_seed(0)
    experts = ExpertLinear(in_features=12, out_features=out_features, num_experts=5, capacity_factor=None)
    torch.nn.init.normal_(experts.weight)
    expert_index = torch.tensor([4, 0, 2, 0, 4, 4, 2, 0, 0, 2, 4])  # experts 1 and 3 get no tokens
    hidden = torch.randn(len(expert_index), 12, requires_grad=True)
    # out_features 7 (28-byte rows) is rejected by grouped_mm's kernels and takes the per-expert fallback.
    assert routed_linear.grouped_mm_takes(hidden, experts.weight) == (out_features == 8)
    if not use_grouped_mm:
        monkeypatch.setattr(routed_linear, "grouped_mm_takes", lambda *args: False)
    scale = torch.rand(len(expert_index), requires_grad=True)
    output = experts(hidden, expert_index, scale)
    upstream = torch.randn_like(output)  # a real upstream gradient: grouped_mm rejects stride-0 ones
    grads = torch.autograd.grad((output * upstream).sum(), (hidden, scale, experts.weight))

    weight = experts.weight.detach().clone().requires_grad_(True)
    hidden_ref, scale_ref = hidden.detach().clone().requires_grad_(True), scale.detach().clone().requires_grad_(True)
    expected = reference_expert_linear(weight, hidden_ref, expert_index, scale_ref)
    ref_grads = torch.autograd.grad((expected * upstream).sum(), (hidden_ref, scale_ref, weight))

    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads[2][1].abs().max() == 0 and grads[2][3].abs().max() == 0  # unused experts: zero gradient
    assert grads[2][0].abs().max() > 0


@pytest.mark.parametrize("projection", ["gate", "up", "down"])
def test_bf16_autocast_training_step_uses_grouped_mm_and_matches_fallback(monkeypatch, projection):
    """Mixed precision (fp32 master weights under bf16 autocast, as `accelerate` runs bf16 on CUDA) must train.
    F.grouped_mm is not on autocast's op list, so a down projection, whose input is the bf16 product of two
    autocast matmuls, once met an fp32 expert weight and crashed. CPU autocast reproduces that path."""
    config = tiny_config(num_experts=4, moe_projections=[projection], expert_output_scaling="straight_through")
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    calls = []  # operand dtypes of every grouped_mm call
    grouped_mm = routed_linear.F.grouped_mm

    def recording_grouped_mm(mat_a, mat_b, **kwargs):
        calls.append((mat_a.dtype, mat_b.dtype))
        return grouped_mm(mat_a, mat_b, **kwargs)

    monkeypatch.setattr(routed_linear.F, "grouped_mm", recording_grouped_mm)

    def loss_and_grads(use_grouped_mm: bool):
        torch.manual_seed(0)
        model = PNetLlamaForCausalLM(config)
        with monkeypatch.context() as patch:
            if not use_grouped_mm:
                patch.setattr(routed_linear, "grouped_mm_takes", lambda *args: False)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = model(input_ids, labels=input_ids)
            output.loss.backward()
        experts = getattr(model.model.layers[0].mlp, f"{projection}_proj")
        return output.loss.detach(), experts.weight.grad

    # Switch's selective precision: the router computes in float32 under autocast too.
    torch.manual_seed(0)
    model = PNetLlamaForCausalLM(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        router_logits = model(input_ids, output_router_logits=True).router_logits
    assert all(logits.dtype == torch.float32 for logits in router_logits)
    router = getattr(model.model.layers[0].mlp, f"{projection}_router")
    router_input = {}
    router.register_forward_hook(lambda module, args, output: router_input.update(x=args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids, output_router_logits=True).router_logits[0]
    expected = router_input["x"].reshape(-1, router.in_features).float() @ router.weight.float().T
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)

    loss, grad = loss_and_grads(use_grouped_mm=True)
    assert calls and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in calls)
    assert grad.dtype == torch.float32 and grad.abs().max() > 0  # the fp32 master weight gets its gradient
    fallback_loss, fallback_grad = loss_and_grads(use_grouped_mm=False)
    torch.testing.assert_close(loss, fallback_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad, fallback_grad, rtol=5e-2, atol=5e-3)


def test_expert_linear_single_token_decode_path():
    torch.manual_seed(1)
    experts = ExpertLinear(in_features=6, out_features=4, num_experts=3, capacity_factor=0.5)
    torch.nn.init.normal_(experts.weight)
    hidden, index, scale = torch.randn(1, 6), torch.tensor([2]), torch.tensor([0.7])
    expected = reference_expert_linear(experts.weight, hidden, index, scale)
    torch.testing.assert_close(experts(hidden, index, scale), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-gather", "bf16-grouped"])
def test_single_token_path_without_host_sync_in_a_compiled_graph(dtype):
    """Compiled (as for CUDA graphs and static caches), the decode path reads the expert index on the device: a
    gather of the expert (fp32) or a grouped matmul with one non-empty group (bf16)."""
    torch.manual_seed(1)
    experts = ExpertLinear(in_features=16, out_features=8, num_experts=4, capacity_factor=None).to(dtype)
    torch.nn.init.normal_(experts.weight)
    hidden, scale = torch.randn(1, 16, dtype=dtype), torch.tensor([0.7], dtype=dtype)
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    for expert in range(4):
        index = torch.tensor([expert])
        expected = reference_expert_linear(experts.weight.float(), hidden.float(), index, scale.float())
        torch.testing.assert_close(compiled(hidden, index, scale).float(), expected, rtol=1e-2, atol=1e-2)


def test_capacity_factor_drops_overflow_tokens():
    torch.manual_seed(2)
    experts = ExpertLinear(in_features=5, out_features=3, num_experts=4, capacity_factor=1.0)
    torch.nn.init.normal_(experts.weight)
    hidden = torch.randn(8, 5)
    ones = torch.ones(8)
    # capacity = ceil(8 / 4 * 1.0) = 2: expert 0 gets 5 tokens, keeps the first two in token order.
    index = torch.tensor([0, 1, 0, 0, 2, 0, 3, 0])
    output = experts(hidden, index, ones)
    expected = reference_expert_linear(experts.weight, hidden, index, ones)
    kept = torch.tensor([1, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(output[kept], expected[kept])
    assert output[~kept].abs().max() == 0
    # Balanced routing within capacity drops nothing.
    balanced = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    expected = reference_expert_linear(experts.weight, hidden, balanced, ones)
    torch.testing.assert_close(experts(hidden, balanced, ones), expected)
    # A single expert with a capacity factor below 1 also drops: capacity ceil(8 / 1 * 0.5) = 4.
    single = ExpertLinear(in_features=5, out_features=3, num_experts=1, capacity_factor=0.5)
    torch.nn.init.normal_(single.weight)
    output = single(hidden, torch.zeros(8, dtype=torch.long), ones)
    torch.testing.assert_close(output[:4], hidden[:4] @ single.weight[0].T)
    assert output[4:].abs().max() == 0


# ----------------------------------------------------------------------------------------------------------------------
# Router losses
# ----------------------------------------------------------------------------------------------------------------------


def test_load_balancing_loss_hand_computed_and_uniform():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    s1, s2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))  # softmax([a, 0])[0] = sigmoid(a)
    mean_p0 = (s1 + (1 - s1) + s2) / 3
    expected = 2 * (2 / 3 * mean_p0 + 1 / 3 * (1 - mean_p0))
    assert load_balancing_loss((logits,)).item() == pytest.approx(expected, rel=1e-6)
    # Mean over routers.
    uniform = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    assert load_balancing_loss((logits, uniform)).item() == pytest.approx((expected + 1.0) / 2, rel=1e-6)
    # Perfectly uniform routing (f_i = P_i = 1/N) gives exactly 1.0, and collapse onto one expert gives N.
    assert load_balancing_loss((uniform,)).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.tensor([[50.0, 0.0, 0.0, 0.0]]).repeat(6, 1)
    assert load_balancing_loss((collapsed,)).item() == pytest.approx(4.0, rel=1e-6)
    z = router_z_loss((logits,)).item()
    assert z == pytest.approx(sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in logits.tolist()) / 3)


def test_router_losses_exclude_padding_tokens():
    torch.manual_seed(3)
    valid = torch.randn(5, 4)
    padded = torch.cat([torch.full((3, 4), 0.0).index_fill_(1, torch.tensor([2]), 9.0), valid])
    mask = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])  # batch 2, seq 4: three left-padding tokens
    torch.testing.assert_close(load_balancing_loss((padded,), mask), load_balancing_loss((valid,)))
    torch.testing.assert_close(router_z_loss((padded,), mask), router_z_loss((valid,)))
    assert not torch.allclose(load_balancing_loss((padded,)), load_balancing_loss((valid,)))


def test_model_loss_combines_lm_aux_and_z_losses_with_padding_mask():
    torch.manual_seed(4)
    config = tiny_config(num_experts=4, moe_projections=["gate", "down"], router_z_loss_coef=1e-3, pad_token_id=0)
    model = PNetLlamaForCausalLM(config).eval()
    input_ids = torch.randint(1, config.vocab_size, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    input_ids[0, :2] = 0
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
    assert len(out.router_logits) == 4 and model.model.router_names() == [
        "layers.0.mlp.gate",
        "layers.0.mlp.down",
        "layers.1.mlp.gate",
        "layers.1.mlp.down",
    ]
    assert all(logits.shape == (12, 4) and logits.dtype == torch.float32 for logits in out.router_logits)
    keep = attention_mask.reshape(-1).bool()
    expected_aux = load_balancing_loss(tuple(logits[keep] for logits in out.router_logits))
    expected_z = router_z_loss(tuple(logits[keep] for logits in out.router_logits))
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.z_loss, expected_z)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss + 1e-3 * out.z_loss)
    # Without output_router_logits the losses are still computed for training, but no logits are returned.
    plain = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    assert plain.router_logits is None
    torch.testing.assert_close(plain.loss, out.loss)


# ----------------------------------------------------------------------------------------------------------------------
# Equivalences: E = 1 is LLaMA; upcycling preserves the function
# ----------------------------------------------------------------------------------------------------------------------


def test_single_expert_model_is_exactly_llama():
    dense = tiny_dense()
    config = tiny_config(num_experts=1, moe_projections=["gate", "up", "down"])  # Switch scaling: p = 1 exactly
    model = PNetLlamaForCausalLM(config).eval()
    state = {k: (v[None] if k.endswith("_proj.weight") and ".mlp." in k else v) for k, v in dense.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert all(key.endswith("router.weight") for key in missing) and not unexpected
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    torch.testing.assert_close(model(input_ids).logits, dense(input_ids).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------------


def test_in_process_auto_load_and_missing_or_mismatched_expert_weights_fail(tmp_path):
    torch.manual_seed(6)
    model = PNetLlamaForCausalLM(tiny_config(num_experts=4)).eval()
    model.save_pretrained(tmp_path / "ok")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ok").eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)

    weights = load_file(tmp_path / "ok" / "model.safetensors")
    del weights["model.layers.1.mlp.down_router.weight"]
    model.save_pretrained(tmp_path / "missing")
    save_file(weights, tmp_path / "missing" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"refusing to random-initialise.*layers\.1\.mlp\.down_router\.weight"):
        PNetLlamaForCausalLM.from_pretrained(tmp_path / "missing")

    with pytest.raises((ValueError, RuntimeError), match="mismatch|num_experts"):
        PNetLlamaForCausalLM.from_pretrained(tmp_path / "ok", num_experts=8)


# ----------------------------------------------------------------------------------------------------------------------
# Generation, training, variants
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_model_learns_and_every_router_gets_gradient():
    torch.manual_seed(9)
    config = tiny_config(num_experts=4, moe_projections=["gate", "up", "down"], router_z_loss_coef=1e-3)
    model = PNetLlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, config.vocab_size, (4, 16))
    losses = []
    for step in range(30):
        out = model(batch, labels=batch)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            router_grads = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if "router" in n}
            assert len(router_grads) == 6 and all(g > 0 for g in router_grads.values()), router_grads
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_shared_router_sends_a_token_to_the_same_expert_everywhere():
    torch.manual_seed(10)
    config = tiny_config(num_experts=3, moe_projections=["gate", "up", "down"], shared_router=True)
    mlp = PNetLlamaMLP(config)
    for param in mlp.parameters():
        torch.nn.init.normal_(param, std=0.3)
    assert mlp.router is not None and mlp.gate_router is None and mlp.down_router is None
    hidden = torch.randn(2, 5, config.hidden_size)
    tokens = hidden.reshape(-1, config.hidden_size)
    probs = torch.softmax(tokens @ mlp.router.weight.T, dim=-1)
    p, e = probs.max(-1)
    gate = torch.stack([mlp.gate_proj.weight[i] @ x for x, i in zip(tokens, e)]) * p[:, None]
    up = torch.stack([mlp.up_proj.weight[i] @ x for x, i in zip(tokens, e)]) * p[:, None]
    act = torch.nn.functional.silu(gate) * up
    down = torch.stack([mlp.down_proj.weight[i] @ x for x, i in zip(act, e)]) * p[:, None]
    torch.testing.assert_close(mlp(hidden), down.reshape(2, 5, -1), rtol=1e-5, atol=1e-5)

    model = PNetLlamaModel(config)
    out = model(torch.randint(0, config.vocab_size, (1, 4)), output_router_logits=True)
    assert len(out.router_logits) == config.num_hidden_layers
    assert model.router_names() == ["layers.0.mlp.shared", "layers.1.mlp.shared"]


def test_jitter_only_in_training():
    torch.manual_seed(11)
    model = PNetLlamaForCausalLM(tiny_config(num_experts=4, router_jitter_noise=0.5))
    input_ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    model.eval()
    first = model(input_ids, output_router_logits=True).router_logits[0]
    torch.testing.assert_close(model(input_ids, output_router_logits=True).router_logits[0], first, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(input_ids, output_router_logits=True).router_logits[0], first)


def test_sequence_classification_forward_loss_and_save_load(tmp_path):
    torch.manual_seed(12)
    config = tiny_config(num_experts=2, num_labels=3, pad_token_id=0)
    model = PNetLlamaForSequenceClassification(config).eval()
    input_ids = torch.randint(1, config.vocab_size, (2, 7))
    input_ids[1, -2:] = 0  # right padding: the classifier reads the last non-pad token
    attention_mask = (input_ids != 0).long()
    labels = torch.tensor([0, 2])
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, 3)
    expected_task = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.task_loss, expected_task)
    torch.testing.assert_close(out.loss, expected_task + 0.01 * out.aux_loss)
    torch.testing.assert_close(model(input_ids[1:, :5]).logits, out.logits[1:], rtol=1e-5, atol=1e-5)
    # Router logits of the inherited forward's backbone call: one (batch*seq, E) per router; the aux loss is theirs.
    routed = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    assert len(routed.router_logits) == len(model.model.router_names()) > 0
    assert routed.router_logits[0].shape == (14, 2) and routed.loss is None
    torch.testing.assert_close(routed.aux_loss, load_balancing_loss(routed.router_logits, attention_mask))
    assert model(input_ids).router_logits is None and model.model._relayed_router_logits is None  # none kept
    assert isinstance(model(input_ids, labels=labels, return_dict=False), tuple)
    # A causal-LM checkpoint initialises the backbone of the classifier (the new head is the only missing weight).
    PNetLlamaForCausalLM(tiny_config(num_experts=2)).save_pretrained(tmp_path / "lm")
    classifier = PNetLlamaForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3, pad_token_id=0)
    assert classifier(input_ids, attention_mask=attention_mask).logits.shape == (2, 3)


@pytest.mark.parametrize("wrapper", ["torch.compile", "DistributedDataParallel"])
def test_router_losses_with_a_wrapped_backbone(wrapper, tmp_path):
    """A backbone wrapped after construction keeps the relayed logits on the module inside the wrapper, whether the
    wrapper forwards attribute writes to it (torch.compile) or not (DDP, FSDP): every forward, not only the first, adds
    the router losses of its own routing."""
    torch.manual_seed(0)
    model = PNetLlamaForCausalLM(tiny_config(num_experts=4)).eval()
    batches = [torch.randint(1, TINY["vocab_size"], (2, 7)) for _ in range(2)]
    expected = [model(batch, labels=batch) for batch in batches]
    torch._dynamo.reset()
    if wrapper == "torch.compile":
        model.model = torch.compile(model.model, backend="eager")
    else:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
        model.model = torch.nn.parallel.DistributedDataParallel(model.model)
    try:
        for batch, reference in zip(batches, expected):
            out = model(batch, labels=batch)
            torch.testing.assert_close(out.aux_loss, reference.aux_loss, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-6)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert expected[0].aux_loss != expected[1].aux_loss


def test_a_backbone_replaced_after_construction_infers_and_refuses_to_train_without_router_losses():
    """A backbone swapped in after construction has no relay: inference (no router logits asked for) is unaffected,
    and a forward that needs the router losses says so rather than training without them."""
    torch.manual_seed(0)
    model = PNetLlamaForCausalLM(tiny_config(num_experts=2)).eval()
    model.model = PNetLlamaModel(tiny_config(num_experts=2))
    input_ids = torch.randint(1, TINY["vocab_size"], (1, 5))
    assert model(input_ids).logits.shape == (1, 5, TINY["vocab_size"])
    with pytest.raises(RuntimeError, match="PNetLlamaModel relays no router logits: was it replaced after construction"):
        model(input_ids, labels=input_ids)


@pytest.mark.parametrize("head", [PNetLlamaForCausalLM, PNetLlamaForSequenceClassification])
def test_router_losses_in_a_data_parallel_replica(head, data_parallel_replica):
    """nn.DataParallel runs shallow copies that share the original modules' forward hooks: each copy's head must add
    the router losses of its own backbone's routing (the relayed logits are kept on the backbone that ran)."""
    torch.manual_seed(0)
    model = head(tiny_config(num_experts=4, num_labels=3, pad_token_id=0)).eval()
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 7))
    labels = input_ids if head is PNetLlamaForCausalLM else torch.tensor([0, 2])
    expected = model(input_ids, labels=labels, output_router_logits=True)
    out = data_parallel_replica(model)(input_ids, labels=labels, output_router_logits=True)
    assert len(out.router_logits) == len(expected.router_logits) == 2 and expected.aux_loss > 1.0
    for name in ("loss", "aux_loss", "z_loss", "logits"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=0, atol=0)


def test_no_dense_decoder_or_mlp_is_allocated(monkeypatch):
    """LLaMA's constructors build dense decoder layers and MLPs that PNet-LLaMA replaces: on the meta device (no
    memory, no initialisation), so the only real LlamaMLP-free layers are PNet's; the weights are initialised as
    transformers initialises a new LLaMA."""
    from transformers.models.llama import modeling_llama

    real_builds = []
    for cls in (modeling_llama.LlamaMLP, modeling_llama.LlamaDecoderLayer):
        original = cls.__init__

        def recording_init(self, *args, original=original, **kwargs):
            if torch.get_default_device().type != "meta":
                real_builds.append(type(self).__name__)
            original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", recording_init)
    model = PNetLlamaForCausalLM(tiny_config(num_experts=2, moe_projections=["up"]))
    assert real_builds == []  # PNetLlamaDecoderLayer builds its parent on meta too
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(TINY["hidden_size"]))
    assert 0.015 < layer.self_attn.q_proj.weight.std() < 0.025  # normal(0, initializer_range = 0.02)
    fresh = LlamaForCausalLM(LlamaConfig(**TINY))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
