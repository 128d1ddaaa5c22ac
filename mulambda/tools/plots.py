"""Pictures of the benchmarks and the simulator (PNG, matplotlib).

* :func:`plot_scaling_day`: ``bench/autoscale.py --plot DIR``, per scaling
  policy the demand, desired and ready replicas and the waiting requests (or
  tasks) over the simulated day.
* :func:`plot_selectors`: ``mulambda simulate --plot DIR``, latency (p50,
  p95) and accuracy per router, one panel column per figure and one
  point per scenario (the suite's placement x load cells, or the clients of
  one scenario).

Inputs are plain numbers, so the callers keep their own types. matplotlib is
an optional dependency (extra ``plots``); it is imported when a picture is
drawn, never by the commands that do not draw. Every figure is drawn
without a clock or a version in its metadata, so the same figures give the
same file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple


class ScalingPoint(NamedTuple):
    """One sample of a scaling policy over the simulated day."""

    hour: float  # hour of the (possibly compressed) day, 0-24
    demand_rps: float  # requests arriving per second
    desired: int  # replicas the policy wants (ready + starting)
    ready: int  # replicas serving
    waiting: int  # requests queued for a free slot


class SelectorPoint(NamedTuple):
    """What one router achieved in one scenario."""

    p50_ms: float
    p95_ms: float
    accuracy: float


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotsUnavailable("pictures need matplotlib: pip install 'mulambda[plots]'") from exc
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No creation time or software version in the file: the same figures, the same bytes.
    fig.savefig(path, dpi=100, metadata={"Software": None, "Creation Time": None})
    fig.clf()
    _pyplot().close(fig)
    return path


def plot_scaling_day(policies: Mapping[str, Sequence[ScalingPoint]], path: Path, *,
                     title: str = "Autoscaling over a simulated day",
                     waiting: str = "waiting requests") -> Path:
    """One row per policy: replicas desired (dashed) and ready (solid) on the left axis;
    demand (req/s, shaded) and waiting requests (red) on the right one, logarithmic
    (a queue of thousands beside a demand of tens). Same x axis (hour of the day) and
    same scales in every row, so rows compare."""
    if not policies or not all(policies.values()):
        raise ValueError("every policy needs at least one sample")
    plt = _pyplot()
    rows = len(policies)
    height = 2.3 * rows + 1.0
    fig, axes = plt.subplots(rows, 1, figsize=(11, height), sharex=True, squeeze=False)
    top_replicas = max(max(p.desired, p.ready) for pts in policies.values() for p in pts)
    top_requests = max(max(p.demand_rps, p.waiting) for pts in policies.values() for p in pts)
    twins = []
    for ax, (name, points) in zip(axes[:, 0], policies.items(), strict=True):
        hours = [p.hour for p in points]
        right = ax.twinx()
        twins.append(right)
        right.fill_between(hours, [p.demand_rps for p in points], color="0.85", step="post",
                           label="demand (req/s)")
        right.step(hours, [p.waiting for p in points], where="post", color="tab:red",
                   linewidth=1.0, label=waiting)
        right.set_yscale("symlog", linthresh=1.0)
        right.set_ylim(0, max(1.0, top_requests) * 1.5)
        right.set_ylabel("req/s, waiting")
        ax.set_zorder(right.get_zorder() + 1)  # replica lines over the demand shading
        ax.patch.set_visible(False)
        ax.step(hours, [p.desired for p in points], where="post", color="tab:blue",
                linestyle="--", linewidth=1.2, label="desired replicas")
        ax.step(hours, [p.ready for p in points], where="post", color="tab:blue",
                linewidth=1.6, label="ready replicas")
        ax.set_ylim(0, max(1, top_replicas) * 1.1)
        ax.set_ylabel("replicas")
        ax.set_title(name, loc="left", fontsize=10)
        ax.grid(axis="x", color="0.9")
    last = axes[-1, 0]
    last.set_xlim(0, 24)
    last.set_xticks(range(0, 25, 3))
    last.set_xlabel("hour of the simulated day")
    # A twin axis keeps its own legend entries: the first row's two axes give all four.
    lines, labels = axes[0, 0].get_legend_handles_labels()
    more, more_labels = twins[0].get_legend_handles_labels()
    _header(fig, height, title, lines + more, labels + more_labels, 4)
    return _save(fig, path)


def _header(fig: Any, height: float, title: str, handles: list[Any], labels: list[str],
            columns: int) -> None:
    """Title, then the legend under it, then the panels (sizes in inches of ``height``)."""
    fig.suptitle(title, y=1 - 0.12 / height, fontsize=12)
    fig.legend(handles, labels, loc="upper center", ncol=columns, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.38 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))


def plot_selectors(groups: Mapping[str, Mapping[str, Mapping[str, SelectorPoint]]],
                   path: Path, *, title: str = "Routers compared", connect: bool = True,
                   ) -> Path:
    """``groups``: group (e.g. a client kind) -> scenario -> router -> figures. One row
    per group, latency (p50, p95; log scale) and accuracy columns, one line per router
    across the scenarios (``connect``, for ordered scenarios such as rising load), else
    side-by-side markers (p50 dot, p95 bar) per scenario."""
    if not groups or not all(groups.values()):
        raise ValueError("every group needs at least one scenario")
    plt = _pyplot()
    rows = len(groups)
    height = 3.2 * rows + 1.2
    fig, axes = plt.subplots(rows, 2, figsize=(13, height), squeeze=False)
    routers = sorted({r for scenarios in groups.values() for figs in scenarios.values()
                      for r in figs})
    colours = {r: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(routers)}
    for (lat, acc), (group, scenarios) in zip(axes, groups.items(), strict=True):
        names = list(scenarios)
        x = range(len(names))
        for i, router in enumerate(routers):
            figs = [scenarios[s].get(router) for s in names]
            p50 = [f.p50_ms if f else math.nan for f in figs]
            p95 = [f.p95_ms if f else math.nan for f in figs]
            accuracy = [f.accuracy if f else math.nan for f in figs]
            colour = colours[router]
            if connect:
                lat.plot(x, p50, marker="o", markersize=3, color=colour, label=router)
                lat.plot(x, p95, linestyle=":", color=colour)
                acc.plot(x, accuracy, marker="o", markersize=3, color=colour, label=router)
                continue
            # Side by side within each scenario, so routers with equal figures stay apart.
            at = [j + (i - (len(routers) - 1) / 2) * 0.6 / len(routers) for j in x]
            lat.plot(at, p50, linestyle="none", marker="o", markersize=5, color=colour,
                     label=router)
            lat.plot(at, p95, linestyle="none", marker="_", markersize=9, color=colour)
            acc.plot(at, accuracy, linestyle="none", marker="o", markersize=5, color=colour,
                     label=router)
        lat.set_yscale("log")
        lat.set_ylabel("latency ms (p50 -, p95 :)" if connect
                       else "latency ms (p50 dot, p95 bar)")
        acc.set_ylabel("mean accuracy")
        for ax in (lat, acc):
            ax.set_title(group, loc="left", fontsize=10)
            ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
            ax.grid(color="0.92")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    columns = min(len(routers), 5)
    _header(fig, height + 0.2 * (len(routers) // 5), title, handles, labels, columns)
    return _save(fig, path)
