"""bench/bench_moe.py: `--against REV` (another revision's model package, timed beside today's with the same weights)
and the products-alone floor of the routed projection."""

import argparse
import subprocess
import sys

import pytest
import torch


@pytest.fixture
def git_checkout(repo_root):
    if subprocess.run(["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")


@pytest.fixture
def bench_module(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    import bench_moe

    return bench_moe


@pytest.fixture
def bench_moe(bench_module, git_checkout):
    return bench_module


def test_products_alone_are_the_routed_projections_forward_and_gradients(bench_module):
    """The floor times the same products autograd computes for a routed projection, only in sorted order: a floor
    that skipped or shrank one would flatter the goal."""
    import torch.nn.functional as F

    from modeling_pnet_llama.routed_linear import routed_matmul, sort_by_expert

    torch.manual_seed(0)
    tokens, in_features, out_features, experts = 96, 32, 16, 4
    x = torch.randn(tokens, in_features, requires_grad=True)
    expert_weight = torch.randn(experts, out_features, in_features, requires_grad=True)
    router_weight = torch.randn(experts, in_features, requires_grad=True)
    expert_index = torch.randint(0, experts, (tokens,))
    upstream, router_upstream = torch.randn(tokens, out_features), torch.randn(tokens, experts)
    output, router_logits = routed_matmul(x, expert_weight, expert_index), F.linear(x, router_weight)
    torch.autograd.backward([output, router_logits], [upstream, router_upstream])

    order, _, end = sort_by_expert(expert_index, experts)
    floor = bench_module.products_alone(
        x.detach()[order], upstream[order], router_upstream[order], end.to(torch.int32), router_weight, expert_weight
    )
    expected = (output[order], router_logits[order], x.grad[order], expert_weight.grad, router_weight.grad)
    for got, want in zip(floor, expected):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)


TINY = ["--hidden", "64", "--layers", "1", "--vocab", "128", "--batch", "1", "--seq-len", "8", "--new-tokens", "2",
        "--experts", "2", "--repeats", "1", "--threads", "1"]


def test_revision_package_gets_the_same_weights_and_computes_the_same_logits(bench_moe, repo_root):
    args = argparse.Namespace(vocab=128, hidden=64, layers=1, seq_len=8, new_tokens=2, experts=2, projection="down")
    today = bench_moe.build("pnet", args)
    at_head = bench_moe.build_at_revision("HEAD", args, same_weights_as=today)
    assert type(at_head).__module__.startswith("pnet_llama_at_HEAD.")  # not today's module under another name
    assert at_head.state_dict().keys() == today.state_dict().keys()
    tokens = torch.randint(3, 128, (1, 8))
    # HEAD's model code is the working tree's in CI (a clean clone): same weights, same routing, same logits.
    model_code_as_committed = subprocess.run(
        ["git", "-C", str(repo_root), "diff", "--quiet", "HEAD", "--", "modeling_pnet_llama"]
    ).returncode == 0
    if model_code_as_committed:
        torch.testing.assert_close(at_head(tokens).logits, today(tokens).logits, rtol=0, atol=0)


def test_against_prints_the_ratio_to_the_revision(repo_root, git_checkout):
    result = subprocess.run(
        [sys.executable, "bench/bench_moe.py", *TINY, "--parts", "training", "generation", "--against", "HEAD"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # forward+backward, step and generation: each with the pnet / pnet@HEAD line and its round spread
    assert result.stdout.count("pnet / pnet@HEAD") == 3
    assert result.stdout.count("pnet@HEAD / dense") == 3


def test_unknown_revision_is_refused_naming_it(repo_root):
    result = subprocess.run(
        [sys.executable, "bench/bench_moe.py", *TINY, "--parts", "training", "--against", "no-such-revision"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "--against 'no-such-revision': git archive failed" in result.stderr
    assert "training tokens/s" not in result.stdout  # refused before any timing
