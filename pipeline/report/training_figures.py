"""Figures of how the members trained: learning curves and the fit of fitted heads (pure).

Which members get which figure is the caller's choice, from each member's facts
(pipeline/report/facts.py): curves for members trained over several epochs,
the inner-CV curve for fitted heads. Built without pyplot, like figures.py.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pipeline.report.facts import fit_curve
from pipeline.report.figures import best_epoch


def learning_curves_figure(metrics: dict[str, pd.DataFrame], metric: str = "accuracy",
                           unfreeze_after: dict[str, int] | None = None) -> Figure:
    """Loss per epoch (train solid, valid dashed), the competition's validation metric and the learning
    rate, one colour per member; a star marks each member's best epoch under the metric's direction.

    The metric panel plots metrics.csv's ``valid_<metric>`` (``valid_accuracy`` when no frame has it).
    The learning-rate panel (metrics.csv's ``lr``: the head's rate at the end of each epoch) is drawn
    when the frames have that column; an epoch that took no optimizer step (``steps`` 0: a fitted head)
    has no rate. ``unfreeze_after`` (member -> N) marks where fine-tuning's second phase starts: a dotted
    line after epoch N on every panel.
    """
    if not any(f"valid_{metric}" in m for m in metrics.values()):
        metric = "accuracy"
    column = f"valid_{metric}"
    has_valid = any(column in m for m in metrics.values())
    has_lr = any("lr" in m for m in metrics.values())
    panels = 1 + has_valid + has_lr
    fig = Figure(figsize=(1 + 5 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    colours = colormaps["tab10"]
    for i, (name, m) in enumerate(metrics.items()):
        style = dict(color=colours(i % 10), marker="o" if len(m) <= 30 else None, markersize=3)
        axes[0].plot(m["epoch"], m["train_loss"], label=name, **style)
        if "valid_loss" in m:
            axes[0].plot(m["epoch"], m["valid_loss"], linestyle="--", **style)
        if has_valid and column in m:
            axes[1].plot(m["epoch"], m[column], label=name, **style)
            best = best_epoch(m, metric)
            if best is not None:  # a scatter, not a line: the panel's lines stay one per member
                axes[1].scatter([best], m.loc[m["epoch"] == best, column].iloc[:1], marker="*", s=120,
                                color=style["color"], edgecolors="black", zorder=3)
        if has_lr and "lr" in m:
            axes[-1].plot(m["epoch"], _stepped_lr(m), **style)
    phases = sorted({n for n in (unfreeze_after or {}).values() if n})
    for ax in axes:
        for n in phases:
            ax.axvline(n + 0.5, color="grey", linestyle=":", zorder=0)
    axes[0].set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    kinds = [Line2D([], [], color="black", label="train loss"),
             Line2D([], [], color="black", linestyle="--", label="valid loss")]
    members, _ = axes[0].get_legend_handles_labels()
    marks = [Line2D([], [], color="grey", linestyle=":", label="backbone unfrozen")] if phases else []
    fig.legend(handles=members + (kinds if has_valid else kinds[:1]) + marks, loc="outside right upper", fontsize=8)
    if has_valid:
        axes[1].set(title=f"valid {metric} (★ best epoch)", xlabel="epoch", ylabel=metric)
    if has_lr:
        axes[-1].set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
        axes[-1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig


def _stepped_lr(m: pd.DataFrame) -> np.ndarray:
    """metrics.csv's lr, NaN on epochs without an optimizer step (their rate was never used)."""
    lr = pd.to_numeric(m["lr"], errors="coerce").to_numpy(dtype=np.float64)
    if "steps" in m:
        lr = np.where(pd.to_numeric(m["steps"], errors="coerce").to_numpy() == 0, np.nan, lr)
    return lr


def head_fit_figure(records: dict[str, dict]) -> Figure:
    """The inner-CV loss of each C (or ridge alpha) tried, per member (log-scaled), a star on the chosen one.

    ``records`` are the members' head_fit.json by name (pipeline/report/facts.py's fit_curve reads each);
    one with a single value tried shows just its star.
    """

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    colours = colormaps["tab10"]
    parameter, loss = "C", "log loss"
    for i, (name, record) in enumerate(records.items()):
        parameter, chosen, curve, loss = fit_curve(record)
        cs = sorted(curve)
        colour = colours(i % 10)
        if len(cs) > 1:
            ax.plot(cs, [curve[c] for c in cs], marker="o", markersize=3, color=colour, label=name)
        if chosen in curve and len(cs) > 1:
            ax.scatter([chosen], [curve[chosen]], marker="*", s=140, color=colour, edgecolors="black", zorder=3)
    ax.set_xscale("log")
    folds = next((r.get("inner_folds") for r in records.values() if r.get("inner_folds")), None)
    inner = f"{folds}-fold " if folds else ""
    what = "C (inverse regularisation)" if parameter == "C" else "alpha (ridge penalty)"
    ax.set(title=f"fitted head: {inner}inner-CV {loss} by {parameter} (★ chosen {parameter})", xlabel=what,
           ylabel=f"inner-CV {loss}")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return fig
