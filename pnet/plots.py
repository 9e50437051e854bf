"""Plots of ``log.jsonl`` (field names from `pnet.run_log`): the training plot every training command writes, and
the expert-load plot of the Table 7 runner."""

from __future__ import annotations

import math
import os
from typing import Any

from pnet import run_log as L


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# A curve closer than this share of the loss axis to the trained loss would be drawn on top of it.
DISTINCT_CURVE_SHARE = 0.01


def router_losses_to_plot(coefficients: dict[str, float] | None) -> list[str]:
    """The router losses worth a curve: those whose coefficient is not 0 (a loss with coefficient 0 is not trained
    on); all of them when the coefficients are not known."""
    losses = [L.AUX_LOSS, L.Z_LOSS]
    return losses if coefficients is None else [k for k in losses if coefficients.get(k, 0) != 0]


def lm_loss_is_distinct(train: list[dict[str, Any]]) -> bool:
    """Whether the LM loss curve would be visibly apart from the trained loss (more than `DISTINCT_CURVE_SHARE` of
    the loss axis): PNet's router terms (0.01 x aux ~ 0.01 nats) are usually far less."""
    losses = [r[L.LOSS] for r in train]
    span = max(losses) - min(losses) or abs(losses[0]) or 1.0
    return max(abs(r[L.LOSS] - r[L.LM_LOSS]) for r in train) > DISTINCT_CURVE_SHARE * span


def plot_training(log_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None,
                  router_loss_coefficients: dict[str, float] | None = None) -> None:
    """PNG of a training log, one panel per kind of record present:

    * losses: the trained loss, the LM loss when its curve is visibly apart (`lm_loss_is_distinct`; PNet adds router
      losses), validation / evaluation loss;
    * router losses: the load-balancing (aux) loss, 1.0 at uniform routing, and the z-loss (own axis), each only when
      its coefficient (`router_loss_coefficients`: {run_log.AUX_LOSS: coef, run_log.Z_LOSS: coef}) is not 0;
    * accuracy: evaluation accuracy (classifiers), raw and EMA weights;
    * expert load over the whole run: per router and expert, the share of each log window's tokens whose top-1
      choice is that expert (uniform = 1 / num_experts).
    """
    plt = _pyplot()
    records = L.read_log(log_path)
    train = L.train_records(records)
    vals, evals = L.val_records(records), L.eval_records(records)
    loads = [r for r in train if L.EXPERT_LOAD in r]
    routed = any(r.get(L.AUX_LOSS) for r in train)
    router_losses = router_losses_to_plot(router_loss_coefficients) if routed else []
    panels = (["loss"] + (["router"] if router_losses else []) + (["accuracy"] if evals else [])
              + (["load"] if loads else []))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    axes = dict(zip(panels, axes[0]))

    _plot_losses(axes["loss"], train, vals, evals, routed)
    if router_losses:
        _plot_router_losses(axes["router"], train, router_losses)
    if evals:
        _plot_accuracy(axes["accuracy"], evals)
    if loads:
        _plot_expert_load(fig, axes["load"], loads)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _one_point_marker(records: list[dict]) -> dict:
    """A line through one point draws nothing: mark it (a run with a single logged step)."""
    return {"marker": "o", "ms": 3} if len(records) == 1 else {}


def _plot_losses(ax, train: list[dict], vals: list[dict], evals: list[dict], routed: bool) -> None:
    steps = [r[L.STEP] for r in train]
    lm_curve = routed and lm_loss_is_distinct(train)
    label = "train loss" if lm_curve or not routed else "train loss (LM loss + router losses; LM loss on top of it)"
    ax.plot(steps, [r[L.LOSS] for r in train], label=label, lw=1, **_one_point_marker(train))
    if lm_curve:
        ax.plot(steps, [r[L.LM_LOSS] for r in train], "--", label="train LM loss (without router losses)", lw=1,
                **_one_point_marker(train))
    for domain in dict.fromkeys(domain for r in vals for domain in r[L.VAL_LOSS]):  # every domain any record has
        points = [(r[L.STEP], r[L.VAL_LOSS][domain]) for r in vals if domain in r[L.VAL_LOSS]]
        ax.plot(*zip(*points), "o-", ms=3, label=f"validation LM loss: {domain}")
    with_eval_loss = [r for r in evals if L.EVAL_LOSS in r]
    if with_eval_loss:
        ax.plot([r[L.STEP] for r in with_eval_loss], [r[L.EVAL_LOSS] for r in with_eval_loss], "o-", ms=3,
                label="evaluation loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_router_losses(ax, train: list[dict], router_losses: list[str]) -> None:
    steps = [r[L.STEP] for r in train]
    ax.set(xlabel="step", title="Router losses (before coefficients)")
    lines = []
    if L.AUX_LOSS in router_losses:
        lines += ax.plot(steps, [r[L.AUX_LOSS] for r in train], color="tab:blue", lw=1,
                         label="aux (load-balancing) loss", **_one_point_marker(train))
        ax.axhline(1.0, color="tab:blue", ls=":", lw=0.8)
        ax.set_ylabel("aux loss (1.0 = uniform routing)")
    if L.Z_LOSS in router_losses:
        z_ax = ax.twinx() if lines else ax
        lines += z_ax.plot(steps, [r[L.Z_LOSS] for r in train], color="tab:red", lw=1, label="z-loss",
                           **_one_point_marker(train))
        z_ax.set_ylabel("z-loss", color="tab:red")
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    ax.grid(alpha=0.3)


def _plot_accuracy(ax, evals: list[dict]) -> None:
    ax.plot([r[L.STEP] for r in evals], [r[L.EVAL_ACCURACY] for r in evals], "o-", label="evaluation accuracy")
    ema = [r for r in evals if L.EVAL_ACCURACY_EMA in r]
    if ema:
        ax.plot([r[L.STEP] for r in ema], [r[L.EVAL_ACCURACY_EMA] for r in ema], "s--", label="EMA weights")
    ax.set(xlabel="step", ylabel="accuracy", title="Accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_expert_load(fig, ax, loads: list[dict]) -> None:
    names = loads[-1][L.ROUTER_NAMES]
    experts = len(loads[-1][L.EXPERT_LOAD][0])
    # rows: router-major (router 0 expert 0..E-1, router 1 ...); columns: log windows
    matrix = [[window[L.EXPERT_LOAD][r][e] for window in loads] for r in range(len(names)) for e in range(experts)]
    last_steps = [w[L.STEP] for w in loads]
    first_step = loads[0][L.LOAD_WINDOW][0] if L.LOAD_WINDOW in loads[0] else last_steps[0]
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest",
                      extent=(first_step - 0.5, last_steps[-1] + 0.5, len(matrix) - 0.5, -0.5))
    for r in range(1, len(names)):
        ax.axhline(r * experts - 0.5, color="white", lw=0.6)
    ax.set_yticks([r * experts + (experts - 1) / 2 for r in range(len(names))], names, fontsize=7)
    ax.set(xlabel="step", ylabel=f"experts 0-{experts - 1} of each router",
           title=f"Expert load (share of tokens; uniform = {1 / experts:.3f})")
    fig.colorbar(image, ax=ax)


def plot_expert_load_stacked(windows: list[dict[str, Any]], router_names: list[str], title: str,
                             png_path: str | os.PathLike) -> None:
    """Per router, each expert's share of the tokens of each log window, stacked, against training tokens.
    ``windows``: [{"tokens": int, "load": [router][expert] shares}] in training order."""
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    tokens = [w["tokens"] for w in windows]
    cols = min(4, len(router_names))
    rows = math.ceil(len(router_names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
    for i, name in enumerate(router_names):
        ax = axes[i // cols][i % cols]
        shares = list(zip(*[w["load"][i] for w in windows]))  # experts x windows
        ax.stackplot(tokens, shares, labels=[f"expert {e}" for e in range(len(shares))])
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("training tokens", fontsize=8)
        ax.xaxis.set_major_formatter(EngFormatter())
    for j in range(len(router_names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    for r in range(rows):
        axes[r][0].set_ylabel("share of tokens (top-1)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
