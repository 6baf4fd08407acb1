"""pareto.png: held-out loss against KV bytes per token (log x) per regime, seed error bars, the Pareto
frontier (lower-left is better on both axes), the measured bytes at the regime's context beside each
point, and for uptrained methods their step-0 point with an arrow to where uptraining took them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kvlab.bench.suites import Suite
from kvlab.checkpoint import atomic_write


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (<= on both x and y, < on one), sorted by x."""
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            xj <= xi and yj <= yi and (xj < xi or yj < yi) for j, (xj, yj) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def thin_ticks(values: list[float], min_ratio: float = 1.08) -> list[tuple[float, str]]:
    """(position, label) of x ticks: values within `min_ratio` of each other (log scale) share one tick
    labelled with their range, so bytes like 743, 749.2 and 768 do not print over each other."""
    groups: list[list[float]] = []
    for v in sorted(set(values)):
        if groups and v < groups[-1][0] * min_ratio:
            groups[-1].append(v)
        else:
            groups.append([v])
    return [(math.sqrt(g[0] * g[-1]), f"{g[0]:g}" if len(g) == 1 else f"{g[0]:g}–{g[-1]:g}") for g in groups]


def _label_points(ax, fig, points: list[tuple[str, float, float, bool]], colors: dict | None = None) -> None:
    """Method names beside their points, each at the first candidate offset whose text box overlaps no
    label placed before it (points at close bytes and losses otherwise print over each other). A label
    pushed off its first place gets a thin line in its method's colour back to its point."""
    scale = 72.0 / fig.dpi  # display pixels -> points
    placed: list[tuple[float, float, float, float]] = []
    for name, x, y, on in sorted(points, key=lambda p: -p[2]):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        width, height = 6.2 * len(name), 11.0
        candidates = [(8, 6), (8, -15), (-8 - width, 6), (-8 - width, -15), (8, 19), (8, -28)]
        for dx, dy in candidates:
            box = (px + dx, py + dy, px + dx + width, py + dy + height)
            if not any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in placed):
                break
        placed.append(box)
        leader = None
        if (dx, dy) != candidates[0]:
            color = (colors or {}).get(name, "0.4")
            leader = dict(arrowstyle="-", color=color, lw=0.8, alpha=0.8, shrinkA=1, shrinkB=5)
        ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=10,
                    fontweight="bold" if on else "normal", color="black", arrowprops=leader)  # fmt: skip


def pareto_regimes(suite: Suite, rows: list[dict[str, Any]]) -> list[str]:
    """Regimes with a held-out loss, the suite's pareto_regime first."""
    names = [
        r.name
        for r in suite.regimes
        if any(x["regime"] == r.name and "heldout_loss" in x["metrics"] for x in rows)
    ]
    if suite.pareto_regime in names:
        names.remove(suite.pareto_regime)
        names.insert(0, suite.pareto_regime)
    return names


def plot_pareto(
    rows: list[dict[str, Any]], methods: list[str], regimes: list[str], path: Path, title: str
) -> None:
    """Held-out loss vs KV bytes/token (log x), one panel per regime, seed-spread error bars, frontier."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    n = max(1, len(regimes))
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.8 * nrow), squeeze=False)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    labels = []  # placed once the layout is final, where positions on the page are known
    for ax, reg in zip(axes.flat, regimes):
        pts = [
            (
                r["method"],
                r["metrics"]["kv_bytes_per_token"],
                r["metrics"]["heldout_loss"],
                r["metrics"].get("step0.heldout_loss"),
                r["metrics"].get("measured_cache_bytes_per_token"),
            )  # fmt: skip
            for m in methods
            for r in rows
            if r["method"] == m
            and r["regime"] == reg
            and "heldout_loss" in r["metrics"]
            and "kv_bytes_per_token" in r["metrics"]
        ]
        xs = [p[1]["mean"] for p in pts]
        ys = [p[2]["mean"] for p in pts]
        front = pareto_front(list(zip(xs, ys)))
        ax.plot(
            [xs[i] for i in front],
            [ys[i] for i in front],
            "--",
            color="0.45",
            lw=1.5,
            zorder=1,
            label="Pareto frontier",
        )
        step0_drawn = measured_drawn = False
        for i, (m, _, y, y0, xm) in enumerate(pts):
            on = i in front
            if xm is not None:  # what the cache really holds per token at this context, same loss
                ax.plot([xs[i], xm["mean"]], [ys[i], ys[i]], ":", color=colors[m], lw=1, zorder=2)
                label = None if measured_drawn else "cache measured at the regime's context (bf16)"
                style = dict(ms=9, mfc="none", mew=1.2, color=colors[m], zorder=2, label=label)
                ax.plot(xm["mean"], ys[i], "s", **style)
                measured_drawn = True
            if y0 is not None:  # uptrained: where the converted model started, an arrow to where it ended
                ax.plot(xs[i], y0["mean"], "o", ms=7, mfc="none", color=colors[m], zorder=2,
                        label=None if step0_drawn else "step 0 (converted, before uptraining)")  # fmt: skip
                arrow = dict(arrowstyle="->", color=colors[m], lw=1, alpha=0.6)
                ax.annotate("", (xs[i], ys[i]), xytext=(xs[i], y0["mean"]), arrowprops=arrow, zorder=2)
                step0_drawn = True
            ax.errorbar(
                xs[i],
                ys[i],
                yerr=y["std"],
                fmt="o",
                ms=9 if on else 7,
                capsize=4,
                color=colors[m],
                mec="black" if on else colors[m],
                mew=1.2,
                zorder=3,
            )
        ax.set_xscale("log")
        measured_xs = [p[4]["mean"] for p in pts if p[4] is not None]
        xs = xs + measured_xs  # the axis spans both markers
        ticks = thin_ticks(xs)
        ax.xaxis.set_major_locator(FixedLocator([t for t, _ in ticks]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([label for _, label in ticks], rotation=45 if len(ticks) > 5 else 0)
        if xs:
            ax.set_xlim(min(xs) / 1.35, max(xs) * 1.6)
        ax.set_xlabel("KV bytes per token per layer (bf16, log scale) — less is better")
        ax.set_ylabel("held-out loss (nats/token) — lower is better")
        ax.set_title(reg)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=9)
        labels.append((ax, [(m, xs[i], ys[i], i in front) for i, (m, *_) in enumerate(pts)]))
    for ax in list(axes.flat)[len(regimes) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: quality vs KV memory (error bars: std over seeds; bold: on the frontier)")
    fig.tight_layout()
    for ax, points in labels:
        ax.autoscale_view()
        _label_points(ax, fig, points, colors)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
