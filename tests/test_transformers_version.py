"""The supported transformers range: declared once (modeling_pnet_llama/transformers_version.py, linked into
modeling_parameternet), repeated only in pyproject.toml for pip, and read with pip's (packaging's) semantics."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from modeling_parameternet import transformers_version as vision_version
from modeling_pnet_llama import transformers_version
from modeling_pnet_llama.transformers_version import TRANSFORMERS_REQUIREMENT, check_transformers_version

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_same_range():
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in dependencies if d.startswith("transformers")] == [TRANSFORMERS_REQUIREMENT]


def test_both_model_packages_share_one_declaration():
    """modeling_parameternet's file is a link to modeling_pnet_llama's: one text, one range."""
    vision_file = REPO_ROOT / "modeling_parameternet" / "transformers_version.py"
    assert vision_file.is_symlink()
    assert vision_file.resolve() == Path(transformers_version.__file__).resolve()
    assert vision_version.TRANSFORMERS_REQUIREMENT == TRANSFORMERS_REQUIREMENT


@pytest.mark.parametrize("release", ["5.19.0", "5.25.0", "5.99.3", "5.26.0.dev0"])
def test_releases_in_the_range_pass(release):
    assert TRANSFORMERS_REQUIREMENT == "transformers>=5.19,<6"  # the cases below are written for this range
    check_transformers_version(release)


@pytest.mark.parametrize("release", ["6.0.0rc1", "6.0.0.dev0", "6.0.0", "6.1.0", "5.18.2", "5.19.0rc1", "4.57.0"])
def test_releases_outside_the_range_are_refused_as_pip_would(release):
    """`<6` excludes the pre-releases of 6 (a plain version comparison lets 6.0.0rc1 < 6 through)."""
    with pytest.raises(ImportError, match=rf"transformers>=5\.19,<6 is required .* found transformers=={release}:"):
        check_transformers_version(release)


@pytest.mark.parametrize(
    "remove, named",
    [
        ("del moe._can_use_grouped_mm", "transformers.integrations.moe._can_use_grouped_mm"),
        ("import types; torch.ops.transformers = types.SimpleNamespace()",  # an operator namespace without it
         "torch.ops.transformers.grouped_mm_fallback"),
    ],
)
def test_a_release_without_the_internals_the_routed_linear_uses_is_refused_at_import(remove, named):
    """Both model packages import the shared routed linear; a transformers inside the range that lacks one of the two
    internals it calls is refused at import, naming the internal, instead of failing inside the first forward."""
    for package in ("modeling_pnet_llama", "modeling_parameternet"):
        script = f"import torch\nimport transformers.integrations.moe as moe\n{remove}\nimport {package}\n"
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
        assert result.returncode == 1, result.stderr[-2000:]
        last_line = result.stderr.strip().splitlines()[-1]
        assert last_line.startswith("ImportError: pnet's routed linear uses [") and repr(named) in last_line
        assert "transformers>=5.19,<6" in last_line
