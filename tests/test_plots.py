"""The training plot draws only curves a reader can tell apart: the LM loss only when visibly apart from the
trained loss, a router loss only when its coefficient is not 0."""

import json

import matplotlib.figure
import pytest

from pnet import run_log as L
from pnet.plots import plot_training


def write_log(path, router_gap: float) -> None:
    """Ten PNet steps: LM loss 10 -> 7.3, trained loss = LM loss + router_gap, aux ~1, z-loss ~2."""
    with open(path, "w") as f:
        for step in range(1, 11):
            lm = 10.0 - 0.3 * step
            f.write(json.dumps({L.STEP: step, L.LOSS: lm + router_gap, L.LM_LOSS: lm, L.AUX_LOSS: 1.0 + 0.01 * step,
                                L.Z_LOSS: 2.0 - 0.05 * step}) + "\n")


@pytest.fixture
def drawn(monkeypatch):
    """Labels of every curve on each axis of the figure the plot saves."""
    labels = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        lines = [line for ax in fig.axes for line in ax.get_lines()]
        labels.extend(line.get_label() for line in lines if not line.get_label().startswith("_"))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return labels


@pytest.mark.parametrize("gap,coefficients,lm_curve,router_curves", [
    (0.01, {L.AUX_LOSS: 0.01, L.Z_LOSS: 0.0}, False, ["aux (load-balancing) loss"]),  # the tiny-cpu run
    (0.01, None, False, ["aux (load-balancing) loss", "z-loss"]),  # coefficients unknown: both
    (0.5, {L.AUX_LOSS: 0.01, L.Z_LOSS: 0.25}, True, ["aux (load-balancing) loss", "z-loss"]),
    (0.0, {L.AUX_LOSS: 0.0, L.Z_LOSS: 0.0}, False, []),  # no router panel at all
])
def test_training_plot_draws_only_distinct_active_curves(tmp_path, drawn, gap, coefficients, lm_curve, router_curves):
    write_log(tmp_path / "log.jsonl", gap)
    plot_training(tmp_path / "log.jsonl", tmp_path / "training.png", router_loss_coefficients=coefficients)
    assert (tmp_path / "training.png").stat().st_size > 0
    assert ("train LM loss (without router losses)" in drawn) == lm_curve
    assert [label for label in drawn if label in ("aux (load-balancing) loss", "z-loss")] == router_curves
    assert sum(label.startswith("train loss") for label in drawn) == 1


def test_one_logged_step_is_marked_and_validation_domains_may_differ_between_records(tmp_path, monkeypatch):
    """A single training record used to draw an invisible one-point line; a validation record without a domain that
    the first record had raised KeyError after the run had exported final/."""
    markers = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        markers.update({line.get_label(): (line.get_marker(), len(line.get_xdata())) for ax in fig.axes
                        for line in ax.get_lines() if not line.get_label().startswith("_")})
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    rows = [{L.STEP: 4, L.LOSS: 9.0, L.LM_LOSS: 8.99, L.AUX_LOSS: 1.0, L.Z_LOSS: 2.0},
            {L.STEP: 4, L.VAL_LOSS: {"web": 9.1, "arxiv": 9.3}}, {L.STEP: 8, L.VAL_LOSS: {"web": 8.9}},
            {L.STEP: 12, L.VAL_LOSS: {"web": 8.7, "wikipedia": 8.8}}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_training(tmp_path / "log.jsonl", tmp_path / "training.png")
    [train_loss] = [value for label, value in markers.items() if label.startswith("train loss")]
    assert train_loss == ("o", 1) and markers["aux (load-balancing) loss"] == ("o", 1)
    assert {label: n for label, (_, n) in markers.items() if label.startswith("validation")} == {
        "validation LM loss: web": 3, "validation LM loss: arxiv": 1, "validation LM loss: wikipedia": 1}
