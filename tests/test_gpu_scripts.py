"""scripts/gpu/run_gpu_checks.sh on a machine without a GPU: stage names are checked before anything runs, and the
`cuda` stage runs tests/test_cuda.py (every case skipped here) and logs it under $RESULTS."""

import os
import subprocess
import sys

import torch


def run_checks(repo_root, results, *stages):
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS": str(results)}
    return subprocess.run(["bash", "scripts/gpu/run_gpu_checks.sh", *stages], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=600)


def test_unknown_stage_is_refused_before_any_stage_runs(repo_root, tmp_path):
    result = run_checks(repo_root, tmp_path / "gpu", "cuda", "benchh")
    assert result.returncode == 2
    assert "unknown stage 'benchh' (cuda, bench, eval, study)" in result.stderr
    assert not (tmp_path / "gpu").exists()  # nothing ran, not even the valid stage before it


def test_cuda_stage_runs_the_cuda_tests_and_logs_them(repo_root, tmp_path):
    result = run_checks(repo_root, tmp_path / "gpu", "cuda")
    assert result.returncode == 0, result.stdout[-2000:]
    log = (tmp_path / "gpu" / "cuda.log").read_text()
    if not torch.cuda.is_available():
        assert "24 skipped" in log
    assert "== cuda: exit 0 after" in result.stdout and "load average" in result.stdout
