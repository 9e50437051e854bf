"""LoRA on PNet-LLaMA's routed experts with PEFT's 3-D parameter support (`target_parameters`)."""

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM  # noqa: E402
from modeling_pnet_llama.modeling_pnet_llama import ExpertLinear  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "down-e8": dict(num_experts=8, moe_projections=["down"]),
    "shared-gate-up-down-e4": dict(num_experts=4, moe_projections=["gate", "up", "down"], shared_router=True),
}


def base_model(name: str) -> PNetLlamaForCausalLM:
    torch.manual_seed(0)
    return PNetLlamaForCausalLM(PNetLlamaConfig(**BASE, **CONFIGS[name]))


def expert_lora_config(model: PNetLlamaForCausalLM) -> LoraConfig:
    """LoRA on attention (q, v) and on every routed projection's 3-D expert weight."""
    routed = [f"{name}_proj.weight" for name in model.config.moe_projections]
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=routed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_on_experts_trains_merges_saves_and_reloads(name, tmp_path):
    model = get_peft_model(base_model(name), expert_lora_config(base_model(name)))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    for projection in CONFIGS[name]["moe_projections"]:  # one adapter pair per routed projection and layer
        assert sum(f"mlp.{projection}_proj.lora_A" in n for n in adapters) == BASE["num_hidden_layers"]
    # PEFT keeps one rank-r pair per expert: lora_A stacks (num_experts * r, in_features).
    lora_a = dict(model.named_parameters())[next(n for n in adapters if "mlp.down_proj.lora_A" in n)]
    assert lora_a.shape == (CONFIGS[name]["num_experts"] * 4, BASE["intermediate_size"])

    data = torch.randint(3, BASE["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses  # the adapters learn
    for n, p in model.named_parameters():  # and only the adapters moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    expert_b = [p for n, p in model.named_parameters() if "_proj.lora_B" in n and ".mlp." in n]
    assert expert_b and all(p.abs().max() > 0 for p in expert_b)  # B starts at zero: the expert adapters trained

    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=data).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base_model(name), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=data).logits, adapted, rtol=0, atol=0)
        merged = model.merge_and_unload()
        assert isinstance(merged, PNetLlamaForCausalLM) and isinstance(merged.model.layers[0].mlp.down_proj, ExpertLinear)
        torch.testing.assert_close(merged(input_ids=data).logits, adapted, rtol=1e-4, atol=1e-4)


def test_all_linear_skips_the_experts_and_routers():
    """`target_modules="all-linear"` wraps nn.Linear modules only: the 3-D experts and the routers are left out; a
    dense (not routed) projection is an nn.Linear and is included."""
    model = get_peft_model(base_model("down-e8"), LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n.rsplit(".lora_A", 1)[0].split("layers.0.", 1)[-1] for n, _ in model.named_parameters()
               if "lora_A" in n and "layers.0." in n}
    assert wrapped == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj"}
