"""ParameterNet / GhostNet modelling: dynamic convolution, equivalences, errors, save/load, pipeline, learning."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import pipeline
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from modeling_pnet_llama import (
    DynamicConv2d,
    ParameterNetConfig,
    ParameterNetForImageClassification,
    ParameterNetImageProcessor,
)

TINY = dict(
    num_channels=3,
    image_size=32,
    width_multiplier=0.5,
    stages=[[[3, 16, 16, 0, 1]], [[3, 48, 24, 0.25, 2]], [[5, 72, 32, 0.25, 2], [3, 64, 32, 0, 1]]],
    feature_channels=64,
    head_channels=64,
    num_labels=5,
)


def tiny_model(**overrides) -> ParameterNetForImageClassification:
    torch.manual_seed(0)
    return ParameterNetForImageClassification(ParameterNetConfig(**{**TINY, **overrides})).eval()


def per_sample_reference(conv: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """The definition: for each sample, mix the experts with its own coefficients and run a plain conv."""
    outputs = []
    for sample in x:
        alpha = conv.routing_weights(sample[None])[0]
        kernel = (alpha[:, None, None, None, None] * conv.weight).sum(0)
        outputs.append(F.conv2d(sample[None], kernel, stride=conv.stride, padding=conv.padding, groups=conv.groups))
    return torch.cat(outputs)


@pytest.mark.parametrize(
    "in_ch,out_ch,kernel,stride,groups,routing",
    [(6, 10, 1, 1, 1, "sigmoid"), (8, 8, 3, 1, 8, "softmax"), (6, 12, 3, 2, 1, "sigmoid"), (8, 8, 5, 2, 8, "sigmoid")],
)
def test_dynamic_conv_matches_per_sample_loop(in_ch, out_ch, kernel, stride, groups, routing):
    torch.manual_seed(0)
    conv = DynamicConv2d(in_ch, out_ch, kernel, stride, groups, num_experts=4, routing_activation=routing)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.routing.weight)
    x = torch.randn(3, in_ch, 9, 9, requires_grad=True)
    upstream = torch.randn(3, out_ch, (9 + 2 * (kernel // 2) - kernel) // stride + 1, (9 + 2 * (kernel // 2) - kernel) // stride + 1)

    y = conv(x)
    grads = torch.autograd.grad((y * upstream).sum(), [x, conv.weight, conv.routing.weight, conv.routing.bias])
    y_ref = per_sample_reference(conv, x)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), [x, conv.weight, conv.routing.weight, conv.routing.bias])

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    # The samples really get different kernels.
    assert not torch.allclose(conv.routing_weights(x)[0], conv.routing_weights(x)[1])


def test_identical_experts_equal_plain_conv_network():
    """E=4 with softmax routing and every expert = the GhostNet kernel gives the GhostNet (E=1) network exactly."""
    ghostnet = tiny_model(num_experts=1)
    parameternet = tiny_model(num_experts=4, routing_activation="softmax")
    ghost_state = ghostnet.state_dict()
    new_state = {}
    for key, value in parameternet.state_dict().items():
        if key in ghost_state:
            source = ghost_state[key]
            new_state[key] = source.expand_as(value).clone() if source.shape != value.shape else source
        else:
            assert ".routing." in key, key  # only the routers are new
            new_state[key] = torch.randn_like(value)
    parameternet.load_state_dict(new_state)
    # Give the BatchNorms non-trivial statistics so that the comparison covers them.
    for bn_g, bn_p in zip(
        (m for m in ghostnet.modules() if isinstance(m, torch.nn.BatchNorm2d)),
        (m for m in parameternet.modules() if isinstance(m, torch.nn.BatchNorm2d)),
    ):
        stats = torch.rand_like(bn_g.running_var) + 0.5
        bn_g.running_var.copy_(stats), bn_p.running_var.copy_(stats)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(parameternet(x).logits, ghostnet(x).logits, rtol=1e-4, atol=1e-5)
    n_dynamic = sum(isinstance(m, DynamicConv2d) for m in parameternet.modules())
    assert n_dynamic == sum(isinstance(m, torch.nn.Conv2d) for m in ghostnet.modules()) - sum(
        isinstance(m, torch.nn.Conv2d) for m in parameternet.modules()
    )


def test_outputs_and_loss():
    model = tiny_model()
    labels = torch.tensor([0, 4])
    out = model(torch.randn(2, 3, 32, 32), labels=labels, output_hidden_states=True)
    assert isinstance(out, ImageClassifierOutputWithNoAttention)
    assert out.logits.shape == (2, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert len(out.hidden_states) == 1 + len(TINY["stages"])
    assert model(torch.randn(1, 3, 48, 40)).logits.shape == (1, 5)  # other resolutions work


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="1 channels; this model takes num_channels=3"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"too small; allowed: height and width >= 8"):
        model(torch.randn(2, 3, 4, 32))
    with pytest.raises(ValueError, match="expected 4 dims"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="num_experts=0 is invalid"):
        ParameterNetConfig(num_experts=0)
    with pytest.raises(ValueError, match="stride 3 is invalid"):
        ParameterNetConfig(stages=[[[3, 16, 16, 0, 3]]])
    with pytest.raises(ValueError, match="kernel 4 is invalid"):
        ParameterNetConfig(stages=[[[4, 16, 16, 0, 1]]])
    with pytest.raises(ValueError, match=r"stages\[0\]\[0\]=\[3, 16\] is invalid"):
        ParameterNetConfig(stages=[[[3, 16]]])
    with pytest.raises(ValueError, match=r"stages=\[\] is invalid"):
        ParameterNetConfig(stages=[])
    with pytest.raises(ValueError, match="routing_activation='tanh' is invalid"):
        ParameterNetConfig(routing_activation="tanh")
    with pytest.raises(ValueError, match="num_experts=0 is invalid"):
        DynamicConv2d(4, 4, 3, num_experts=0)


def test_save_fresh_process_load_same_logits_and_pipeline(tmp_path):
    model = tiny_model(id2label={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}, label2id={"a": 0, "b": 1, "c": 2, "d": 3, "e": 4})
    processor = ParameterNetImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    save_dir = tmp_path / "model"
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    assert {"model.safetensors", "configuration_parameternet.py", "modeling_parameternet.py",
            "image_processing_parameternet.py"} <= set(os.listdir(save_dir))

    x = torch.randn(2, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        expected = model(x).logits.numpy()
    # A fresh interpreter in an empty folder: the classes can only come from the code saved with the weights.
    script = (
        "import sys, numpy as np, torch\n"
        "from transformers import AutoModelForImageClassification, AutoImageProcessor\n"
        f"model = AutoModelForImageClassification.from_pretrained({str(save_dir)!r}, trust_remote_code=True).eval()\n"
        f"proc = AutoImageProcessor.from_pretrained({str(save_dir)!r}, trust_remote_code=True)\n"
        "assert 'modeling_pnet_llama' not in sys.modules, 'loaded the installed package, not the saved code'\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'y.npy')!r}, model(x).logits.numpy())\n"
        "print(type(model).__name__, type(proc).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ParameterNetForImageClassification ParameterNetImageProcessor" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)

    # pipeline smoke test, offline, on a PIL image of another size.
    from PIL import Image

    classifier = pipeline("image-classification", model=str(save_dir), trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    assert len(predictions) == 3 and {p["label"] for p in predictions} <= {"a", "b", "c", "d", "e"}
    assert abs(sum(p["score"] for p in classifier(image, top_k=5)) - 1.0) < 1e-4


@pytest.fixture
def one_thread():
    # Two threads on a busy 2-core machine spin against each other; restore the session's setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_model_learns_fashion_mnist(shared_data, repo_root, one_thread):
    from pnet.vision_data import load_idx_dataset

    data = load_idx_dataset(str(shared_data / "images" / "fashion-mnist"), limit=64)["train"][:]
    processor = ParameterNetImageProcessor(
        size={"height": 28, "width": 28}, do_center_crop=False, do_convert_grayscale=True, image_mean=[0.286], image_std=[0.353]
    )
    pixel_values = processor(data["image"], return_tensors="pt").pixel_values
    labels = torch.tensor(data["label"])
    config = json.loads((repo_root / "configs/vision/fmnist-parameternet.json").read_text())
    config.pop("model_type")
    torch.manual_seed(0)
    model = ParameterNetForImageClassification(ParameterNetConfig(**config)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        batch = slice((step % 2) * 32, (step % 2 + 1) * 32)
        loss = model(pixel_values[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 2.0  # ~ln(10) at initialisation
    assert sum(losses[-2:]) / 2 < 0.75 * sum(losses[:2]) / 2, losses
