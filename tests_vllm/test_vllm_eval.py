"""`pnet-eval --backend vllm`: lm-eval's vllm model type scores the bundled zero-shot sets as its hf model type does."""

from __future__ import annotations

import pytest

from pnet_eval import zero_shot

TASKS = sorted(zero_shot.TASKS)  # arc_easy, boolq, hellaswag, sst2
LIMIT = 20  # documents per task: 20 x (4 + 2 + 4 + 2) = 240 loglikelihood requests per backend


@pytest.mark.parametrize("name", ["gate_up_down_shared_e4"])
def test_vllm_backend_matches_hf(name, tiny_pnet_dirs, tmp_path):
    common = dict(tasks=TASKS, data_dir="bundled", limit=LIMIT, device="cpu", dtype="float32")
    [hf] = zero_shot.evaluate(str(tiny_pnet_dirs[name]), output_dir=tmp_path / "hf", **common)
    [vllm] = zero_shot.evaluate(str(tiny_pnet_dirs[name]), backend="vllm", output_dir=tmp_path / "vllm", **common)
    assert (hf["backend"], vllm["backend"]) == ("hf", "vllm")
    for task in TASKS:
        assert vllm["tasks"][task]["docs"] == hf["tasks"][task]["docs"] == LIMIT
        for metric in zero_shot.TASKS[task].metrics:
            assert vllm["tasks"][task][metric] == pytest.approx(hf["tasks"][task][metric], abs=1e-9), (task, metric)


def test_unknown_backend_fails_before_loading(tiny_pnet_dirs):
    with pytest.raises(ValueError, match="backend must be one of \\['hf', 'vllm'\\], got 'sglang'"):
        zero_shot.evaluate(str(tiny_pnet_dirs["down_e8"]), backend="sglang", data_dir="bundled")
