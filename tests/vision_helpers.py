"""Shared by the vision tests: non-trivial BatchNorms, and a saved folder checked in a fresh interpreter and through
the image-classification pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import pipeline


def randomize_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (a fresh model's are the identity), and a head
    that gives logits of order 1 (the default init makes them ~1e-3): comparisons then mean something."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.2, generator=generator)
        for layer in (model.head, model.classifier):
            layer.weight.normal_(0, 3 / layer.in_features**0.5, generator=generator)
    return model


def check_saved_folder(model: torch.nn.Module, save_dir: Path, tmp_path: Path, labels: list[str]) -> None:
    """`save_dir` (model + image processor) loaded in a fresh interpreter in an empty folder, where the classes can only
    come from the code saved with the weights, gives the same logits as `model`; the image-classification pipeline
    runs on it offline, on a PIL image of another size."""
    x = torch.randn(2, model.config.num_channels, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        expected = model(x).logits.numpy()
    script = (
        "import sys, numpy as np, torch\n"
        "from transformers import AutoModelForImageClassification, AutoImageProcessor\n"
        f"model = AutoModelForImageClassification.from_pretrained({str(save_dir)!r}, trust_remote_code=True).eval()\n"
        f"proc = AutoImageProcessor.from_pretrained({str(save_dir)!r}, trust_remote_code=True)\n"
        "assert 'modeling_parameternet' not in sys.modules, 'loaded the installed package, not the saved code'\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'y.npy')!r}, model(x).logits.numpy())\n"
        "print(type(model).__name__, type(proc).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{type(model).__name__} ParameterNetImageProcessor" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)

    from PIL import Image

    classifier = pipeline("image-classification", model=str(save_dir), trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    assert len(predictions) == 3 and {p["label"] for p in predictions} <= set(labels)
    assert abs(sum(p["score"] for p in classifier(image, top_k=len(labels))) - 1.0) < 1e-4
