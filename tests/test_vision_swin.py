"""PNet-Swin (Table 5): Swin with a routed fc2; exact counts, equivalences, routing against a per-token reference,
loss, errors, save / fresh-process load / pipeline."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import SwinConfig, SwinForImageClassification
from vision_helpers import check_saved_folder

from modeling_parameternet import (
    ParameterNetImageProcessor,
    PNetSwinConfig,
    PNetSwinForImageClassification,
    PNetSwinMoEMLP,
)
from modeling_parameternet.routed_linear import load_balancing_loss
from pnet.counting import count_config, main as pnet_count_main

TINY = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=5)


def tiny_pnet_swin(**overrides) -> PNetSwinForImageClassification:
    torch.manual_seed(0)
    return PNetSwinForImageClassification(PNetSwinConfig(**{**TINY, **overrides})).eval()


# (config, exact params, exact FLOPs, paper params in M, paper FLOPs in M)
PAPER_SWIN = [
    ("swin-300m", 1_947_802, 312_151_872, 1.9, 312),
    ("parameternet-swin-300m", 6_832_210, 323_441_472, 6.8, 323),
]


@pytest.mark.parametrize("name,params,flops,paper_params_m,paper_flops_m", PAPER_SWIN)
def test_paper_swin_counts_exact(repo_root, name, params, flops, paper_params_m, paper_flops_m):
    report = count_config(str(repo_root / "configs" / "vision" / f"{name}.json"))
    assert report.total_params == params
    assert report.flops == flops
    assert round(report.total_params / 1e6, 1) == paper_params_m
    assert round(report.flops / 1e6) == paper_flops_m
    # Swin's own flops() convention has no GELU term: 310.7M for Swin-300M, which rounds to 311M, not the paper's 312M.
    assert report.details["swin_official_flops"] == flops - report.details["flops_gelu"]


def test_swin_count_parts(repo_root):
    """The FLOPs parts of PNet-Swin: the dense Swin's, plus the routers (fc2's input, 4C wide, times 10 experts, in
    blocks 1..11), the experts costing exactly the dense fc2 (one expert per token)."""
    dense = count_config(str(repo_root / "configs/vision/swin-300m.json")).details
    routed = count_config(str(repo_root / "configs/vision/parameternet-swin-300m.json"))
    tokens, dims = [3136, 784, 196, 49], [24, 48, 96, 192]
    blocks = [(s, b) for s, depth in enumerate([2, 2, 6, 2]) for b in range(depth)][1:]
    assert routed.details["flops_moe_routing"] == sum(tokens[s] * 4 * dims[s] * 10 for s, _ in blocks) == 11_289_600
    assert routed.details["flops_moe_experts"] + routed.details["flops_linear"] == dense["flops_linear"]
    assert routed.details["routed_mlps"] == 11
    assert routed.active_params == 1_947_802 + sum(4 * dims[s] * 10 for s, _ in blocks)  # + the routers


def test_pnet_count_cli_reports_swin(repo_root, capsys):
    pnet_count_main([str(repo_root / "configs/vision/swin-300m.json"),
                     str(repo_root / "configs/vision/parameternet-swin-300m.json")])
    out = capsys.readouterr().out
    assert "1,947,802" in out and "312,151,872" in out and "6,832,210" in out and "323,441,472" in out
    assert "1 per GELU output element" in out


def test_one_expert_equals_swin():
    """With one expert (and all its weights copied from a Swin) PNet-Swin computes exactly that Swin."""
    torch.manual_seed(0)
    swin = SwinForImageClassification(SwinConfig(**TINY)).eval()
    pnet = tiny_pnet_swin(num_experts=1, moe_blocks=[0, 1, 2, 3])
    state = {}
    for key, value in pnet.state_dict().items():
        if key.endswith("mlp.router.weight"):
            state[key] = value
        elif key.endswith("mlp.fc2.weight") or key.endswith("mlp.fc2.bias"):
            state[key] = swin.state_dict()[key][None]
        else:
            state[key] = swin.state_dict()[key]
    pnet.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pnet(x).logits, swin(x).logits, rtol=1e-5, atol=1e-6)


def test_routed_mlp_matches_per_token_reference():
    """Outputs and gradients of the routed MLP equal a per-token loop: fc2 of the argmax expert, times its softmax
    probability."""
    torch.manual_seed(0)
    mlp = PNetSwinMoEMLP(PNetSwinConfig(**TINY, num_experts=5), dim=12)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 7, 12, requires_grad=True)
    upstream = torch.randn(3, 7, 12)
    y = mlp(x)
    params = [x, mlp.fc1.weight, mlp.router.weight, mlp.fc2.weight, mlp.fc2.bias]
    grads = torch.autograd.grad((y * upstream).sum(), params)

    hidden = mlp.activation_fn(mlp.fc1(x)).reshape(-1, 48)
    probs = F.linear(hidden, mlp.router.weight).softmax(-1)
    reference = torch.stack([
        probs[t].max() * F.linear(hidden[t], mlp.fc2.weight[probs[t].argmax()], mlp.fc2.bias[probs[t].argmax()])
        for t in range(hidden.shape[0])
    ]).view(3, 7, 12)
    grads_ref = torch.autograd.grad((reference * upstream).sum(), params)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    assert len(set(probs.argmax(-1).tolist())) > 1  # several experts really used


def test_loss_adds_load_balancing():
    model = tiny_pnet_swin(router_aux_loss_coef=0.5).train()
    labels = torch.tensor([0, 3])
    out = model(torch.randn(2, 3, 32, 32), labels=labels)
    assert len(out.router_logits) == 3  # blocks 1, 2, 3 (every block but the first)
    assert out.router_logits[0].shape == (2 * 64, 10)
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(list(out.router_logits)))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels) + 0.5 * out.aux_loss)
    assert out.aux_loss > 1.0  # the model's routing is not uniform
    out.loss.backward()
    assert model.swin.encoder.layers[1].blocks[0].mlp.router.weight.grad.abs().sum() > 0
    assert not out.to_tuple()[0].isnan()


def test_router_logits_compile_fullgraph_and_reach_data_parallel_replicas(data_parallel_replica):
    """The router logits travel from the encoder to the classifier's loss through hooks, not a context variable:
    the classifier compiles as one graph, and a DataParallel copy adds its own routing's load-balancing loss."""
    model = tiny_pnet_swin(router_aux_loss_coef=0.5)
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    expected = model(pixels, labels=labels)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")(pixels, labels=labels)
    for out in (compiled, data_parallel_replica(model)(pixels, labels=labels)):
        assert len(out.router_logits) == 3
        for name in ("loss", "aux_loss", "logits"):
            torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-6, atol=1e-6)


def test_load_balancing_loss_non_uniform_routing_by_hand():
    """N * sum_i f_i * P_i on routing that is not uniform, so a wrong fraction term shows: argmax fractions
    f = (3/4, 1/4), mean probabilities P = (0.5875, 0.4125): 2 * (0.75 * 0.5875 + 0.25 * 0.4125) = 1.0875 (with f
    uniform it would be 1.0, with f = P 1.0306). 1.0 at perfectly uniform routing."""
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.6, 0.4]])
    assert load_balancing_loss([probs.log()]).item() == pytest.approx(1.0875)
    assert load_balancing_loss([probs.log(), torch.zeros(5, 2)]).item() == pytest.approx((1.0875 + 1.0) / 2)
    assert load_balancing_loss([torch.zeros(8, 4)]).item() == pytest.approx(1.0)
    # The router gets the gradient of P only: d/dlogits of N * sum_i f_i * mean_t softmax_i.
    logits = probs.log().requires_grad_()
    load_balancing_loss([logits]).backward()
    softmax = probs.log().requires_grad_()
    reference = 2 * (torch.tensor([0.75, 0.25]) * softmax.softmax(-1).mean(0)).sum()
    reference.backward()
    torch.testing.assert_close(logits.grad, softmax.grad)


def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match="num_experts=0 is invalid"):
        PNetSwinConfig(**TINY, num_experts=0)
    with pytest.raises(ValueError, match=r"moe_blocks=\[4\] is invalid; allowed: distinct block indices in \[0, 4\)"):
        PNetSwinConfig(**TINY, moe_blocks=[4])
    with pytest.raises(ValueError, match="moe_blocks=\\[1, 1\\] is invalid"):
        PNetSwinConfig(**TINY, moe_blocks=[1, 1])
    with pytest.raises(ValueError, match="router_aux_loss_coef=-1 is invalid"):
        PNetSwinConfig(**TINY, router_aux_loss_coef=-1)
    assert PNetSwinConfig(**TINY).moe_blocks == [1, 2, 3]


def test_save_fresh_process_load_same_logits_and_pipeline(tmp_path, repo_root):
    labels = ["a", "b", "c", "d", "e"]
    model = tiny_pnet_swin(id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    processor = ParameterNetImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    save_dir = tmp_path / "model"
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    assert {"model.safetensors", "configuration_pnet_swin.py", "modeling_pnet_swin.py",
            "image_processing_parameternet.py"} <= set(os.listdir(save_dir))
    # The shared files, links in the repository, are written as real files with their content.
    for shared in ("routed_linear.py", "transformers_version.py"):
        assert not (save_dir / shared).is_symlink()
        assert (save_dir / shared).read_text() == (repo_root / "modeling_pnet_llama" / shared).read_text()
    config = json.loads((save_dir / "config.json").read_text())
    assert config["model_type"] == "pnet_swin" and config["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_pnet_swin.PNetSwinForImageClassification")

    check_saved_folder(model, save_dir, tmp_path, labels)


def test_replaced_dense_modules_are_built_on_meta(monkeypatch):
    """Swin's constructors build a dense encoder (inside SwinModel) and a dense SwinModel (inside the classifier) that
    PNet-Swin replaces, and dense MLPs whose fc2 it replaces: all on the meta device (no memory, no initialisation);
    the model gets its storage once, at the end, and is initialised as transformers initialises a new Swin."""
    from transformers.models.swin import modeling_swin

    built = {"encoder": [], "mlp": []}
    for name, cls in (("encoder", modeling_swin.SwinEncoder), ("mlp", modeling_swin.SwinMLP)):
        original = cls.__init__

        def recording_init(self, *args, original=original, name=name, **kwargs):
            built[name].append((type(self).__name__, torch.get_default_device().type))
            original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", recording_init)
    model = tiny_pnet_swin()
    assert built["encoder"] == [("SwinEncoder", "meta"), ("SwinEncoder", "meta"), ("PNetSwinEncoder", "meta")]
    assert {device for _, device in built["mlp"]} == {"meta"}
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    attention = model.swin.encoder.layers[0].blocks[0].attention
    fresh = SwinForImageClassification(SwinConfig(**TINY)).swin.encoder.layers[0].blocks[0].attention
    index, fresh_index = ({k: v for k, v in module.named_buffers() if "relative_position_index" in k}
                          for module in (attention, fresh))
    assert index.keys() == fresh_index.keys() and len(index) == 1
    assert all(torch.equal(index[k], fresh_index[k]) for k in index)  # recomputed after the meta build
