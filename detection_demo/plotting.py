"""The training-curve picture: loss over steps and COCO mAP over epochs, drawn with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_history"]


def plot_history(history: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Draw `history` (as `train.train` records it) into a PNG at `path` and return the path.

    Left: the training loss of every step (faint) and its mean per epoch; right: AP@[.5:.95] and AP50 at every
    evaluation. Uses `Figure` with an Agg canvas, not pyplot, so no display and no global state are involved.
    """
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, map_axes = figure.subplots(1, 2)

    steps = history.get("steps", [])
    if steps:
        loss_axes.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="tab:blue", alpha=0.3,
                       linewidth=0.8, label="step")
    epochs = history.get("epochs", [])
    if epochs:
        loss_axes.plot([e["step"] for e in epochs], [e["loss"] for e in epochs], "o-", color="tab:blue",
                       label="epoch mean")
    loss_axes.set(xlabel="step", ylabel="training loss", title="loss")
    if steps and min(s["loss"] for s in steps) > 0:
        loss_axes.set_yscale("log")
    loss_axes.grid(True, alpha=0.3)
    if steps or epochs:
        loss_axes.legend()

    evals = history.get("evals", [])
    if evals:
        x = [e["epoch"] for e in evals]
        map_axes.plot(x, [e["AP50"] for e in evals], "o-", color="tab:green", label="AP50")
        map_axes.plot(x, [e["AP"] for e in evals], "s-", color="tab:orange", label="AP@[.5:.95]")
        map_axes.legend()
    else:
        map_axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=map_axes.transAxes)
    map_axes.set(xlabel="epoch", ylabel="COCO mAP (val)", title="mAP", ylim=(0.0, 1.0))
    map_axes.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
