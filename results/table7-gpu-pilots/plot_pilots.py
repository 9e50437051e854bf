"""Plots the GPU pilots of results/table7-gpu-pilots/README.md from curves.json: validation loss of each routed row
minus that of the dense run with the same seed (same data order), against training tokens.

    python results/table7-gpu-pilots/plot_pilots.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent
PANELS = [
    ("hidden 128, 4 layers (9.2 M / 11.0 M params), 4,096 tokens/step", 4096, [
        ("up8rp", "dense", "up E=8, router_prob"), ("up8st", "dense", "up E=8, straight_through"),
        ("gate8st", "dense", "gate E=8, straight_through"), ("down8st", "dense", "down E=8, straight_through"),
        ("up4st", "dense", "up E=4, straight_through"), ("up1st", "dense", "up E=1 (sanity)"),
        ("up8-frozen", "dense", "up E=8, frozen random router"), ("up8st-s1", "dense-s1", "up E=8, straight_through, seed 1"),
    ]),
    ("hidden 512, 8 layers (58.1 M / 97.6 M params), 8,192 tokens/step", 8192, [
        ("s-up8rp", "s-dense", "up E=8, router_prob"), ("s-gate8rp", "s-dense", "gate E=8, router_prob"),
        ("s-down8rp", "s-dense", "down E=8, router_prob"), ("s-up8rp-s1", "s-dense-s1", "up E=8, router_prob, seed 1"),
        ("s-up8st", "s-dense", "up E=8, straight_through (cut at 1,590 steps)"),
        ("s-gate8st", "s-dense", "gate E=8, straight_through (cut)"), ("s-down8st", "s-dense", "down E=8, straight_through (cut)"),
        ("s-dense-s1", "s-dense", "dense seed 1 - dense seed 0 (seed spread)"),
    ]),
]


def main() -> None:
    runs = json.loads((HERE / "curves.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, (title, tokens_per_step, lines) in zip(axes, PANELS):
        for run, base, label in lines:
            base_val = {p["step"]: p["mean"] for p in runs[base]["val"]}
            points = [(p["step"] * tokens_per_step / 1e6, p["mean"] - base_val[p["step"]])
                      for p in runs[run]["val"] if p["step"] in base_val]
            style = ":" if "seed" in label else ("--" if "straight" in label or "frozen" in label else "-")
            ax.plot(*zip(*points), style, marker="o", markersize=3, label=label)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set(title=title, xlabel="training tokens (M)", ylabel="validation loss minus dense (same seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("GPU pilots: routed rows vs dense at equal tokens and active FLOPs (below 0 = routed is better)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "val_loss_vs_dense.png", dpi=110)


if __name__ == "__main__":
    main()
