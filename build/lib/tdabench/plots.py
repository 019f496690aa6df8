"""Figures of the results table (matplotlib, no display needed). Points are means over the
selection/held-out splits (and projection seeds); bars are one standard deviation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from tdabench.io import atomic_path  # noqa: E402

COLORS = {
    "sjlt": "tab:orange",
    "gaussian": "tab:red",
    "rademacher": "tab:brown",
    "blockwise": "tab:purple",
    "blockwise_equal": "tab:pink",
    "blockwise_unnormalized": "tab:olive",
    "select_then_project": "tab:cyan",
}
SELECT_MARKERS = {
    "best_single": ("s", "best single (chosen)"),
    "greedy": ("*", "greedy (chosen prefix)"),
    "greedy_budget": ("D", "greedy within a budget"),
}


def _save(fig, path) -> None:
    """Write the figure as PNG at `path` and as SVG next to it."""
    fig.tight_layout()
    for target in (Path(path), Path(path).with_suffix(".svg")):
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=target.suffix.lstrip("."), dpi=120)
    plt.close(fig)


def _mean_sd(t: pl.DataFrame, by: list[str], x: str, metric: str) -> pl.DataFrame:
    """Mean x, mean and sd of `metric` per group, sorted by x."""
    return (
        t.group_by(by or pl.lit(0), maintain_order=True)
        .agg(
            pl.col(x).mean().alias("x"), pl.col(metric).mean().alias("m"), pl.col(metric).std().fill_null(0).alias("sd")
        )
        .sort("x")
    )


def _settings(table: pl.DataFrame, width: float):
    settings = table["setting"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(settings), figsize=(width * len(settings), 4.8), squeeze=False)
    return fig, zip(axes[0], settings)


def _metric_panel(ax, xlabel: str, metric: str, title: str) -> None:
    """A panel of `metric` (0..1) against a log-scaled x with plain tick labels."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def plot_metric_vs_dim(table: pl.DataFrame, path: str | Path, metric: str = "top1") -> None:
    """Per setting: `metric` against representation dimension (log x) for select, project and full."""
    fig, panels = _settings(table, 7.2)
    for ax, setting in panels:
        t = table.filter(pl.col("setting") == setting)
        single = _mean_sd(t.filter(pl.col("method") == "single"), ["components"], "dim", metric)
        ax.scatter(single["x"], single["m"], s=12, color="0.65", label="single component")
        steps = _mean_sd(t.filter(pl.col("method") == "greedy_step"), ["step"], "dim", metric)
        ax.plot(steps["x"], steps["m"], "-", lw=1, color="tab:blue", alpha=0.6, label="greedy steps")
        for method, (marker, label) in SELECT_MARKERS.items():
            pts = _mean_sd(
                t.filter(pl.col("method") == method), ["variant"] if method == "greedy_budget" else [], "dim", metric
            )
            if pts.height:
                ax.errorbar(
                    pts["x"],
                    pts["m"],
                    yerr=pts["sd"],
                    fmt=marker,
                    ms=9 if marker == "*" else 6,
                    color="tab:blue",
                    capsize=3,
                    label=label,
                    zorder=5,
                )
        projected = t.filter(pl.col("method").is_in(["projection", "select_then_project"]))
        for variant in projected["variant"].unique(maintain_order=True).to_list():
            pts = _mean_sd(projected.filter(pl.col("variant") == variant), ["k"], "dim", metric)
            ax.errorbar(
                pts["x"],
                pts["m"],
                yerr=pts["sd"],
                fmt="-o",
                ms=3,
                capsize=3,
                color=COLORS.get(variant),
                label=f"projection: {variant}",
            )
        full = t.filter(pl.col("method") == "full")
        ax.axhline(full[metric].mean(), ls="--", color="k", lw=1, label=f"full gradient (dim {full['dim'][0]:,})")
        for variant, ls in (("prompt", "-."), ("prompt_response", ":")):
            bm25 = t.filter((pl.col("method") == "bm25") & (pl.col("variant") == variant))
            if bm25.height:
                ax.axhline(bm25[metric].mean(), ls=ls, color="tab:green", lw=1, label=f"BM25 ({variant})")
        ax.axhline(t.filter(pl.col("method") == "chance")[metric].mean(), ls=":", color="tab:red", lw=1, label="chance")
        _metric_panel(ax, "representation dimension (log)", metric, f"{setting}: {metric} on held-out queries")
        ax.legend(fontsize=6.5, loc="upper left", framealpha=0.85, ncol=2)
    _save(fig, path)


def plot_metric_vs_cost(table: pl.DataFrame, path: str | Path, metric: str = "top1") -> None:
    """Per setting: `metric` against the measured time to represent one new sample (log x)."""
    fig, panels = _settings(table, 7.2)
    for ax, setting in panels:
        t = table.filter((pl.col("setting") == setting) & pl.col("seconds_per_sample").is_not_null())
        pts = _mean_sd(t, ["method", "variant", "k"], "seconds_per_sample", metric)
        for r in pts.iter_rows(named=True):
            ms = r["x"] * 1e3
            color = "k" if r["method"] == "full" else COLORS.get(r["variant"], "tab:blue")
            ax.errorbar([ms], [r["m"]], yerr=[r["sd"]], fmt="o", ms=4, color=color, capsize=3)
            label = (r["variant"] or r["method"]) + (f" k={r['k']}" if r["k"] is not None else "")
            ax.annotate(label, (ms, r["m"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        _metric_panel(
            ax,
            "ms to represent one new sample: gradient extraction + reduction (log)",
            metric,
            f"{setting}: {metric} against cost",
        )
    _save(fig, path)


def plot_single_heatmap(table: pl.DataFrame, path: str | Path, metric: str = "top1") -> None:
    """Per setting: `metric` of every single component, layers (rows) x families (columns)."""
    import numpy as np

    fig, panels = _settings(table, 6.4)
    for ax, setting in panels:
        t = (
            table.filter((pl.col("setting") == setting) & (pl.col("method") == "single"))
            .group_by("components", maintain_order=True)
            .agg(pl.col(metric).mean())
        )
        cells = {}
        for name, value in zip(t["components"], t[metric]):
            layer, family = _layer_family(name)
            cells[(layer, family)] = value
        layers = sorted({k[0] for k in cells}, key=lambda x: (x == "other", x if x != "other" else 0))
        families = list(dict.fromkeys(k[1] for k in cells))
        grid = np.full((len(layers), len(families)), np.nan)
        for (layer, family), value in cells.items():
            grid[layers.index(layer), families.index(family)] = value
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(1e-9, np.nanmax(grid)), aspect="auto")
        for i in range(len(layers)):
            for j in range(len(families)):
                if not np.isnan(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="w" if grid[i, j] < 0.6 * np.nanmax(grid) else "k",
                    )
        ax.set_xticks(range(len(families)), families, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [f"layer {x}" if x != "other" else "outside layers" for x in layers])
        ax.set_title(f"{setting}: {metric} of single components (held-out)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    _save(fig, path)


def _layer_family(short: str) -> tuple:
    """("3", "down") for "layers.3.mlp.down_proj"; ("other", "lm_head") for "lm_head"."""
    from tdabench.components import family_of, layer_of

    full = f"model.{short}.weight"
    layer = layer_of(full)
    family = family_of(full)
    return (layer if layer is not None else "other", family if family != "other" else short)


def plot_greedy_curve(table: pl.DataFrame, path: str | Path, metric: str = "top1") -> None:
    """Per setting: `metric` of each greedy step against the share of parameters it uses, with the
    full gradient and the chosen prefix (mean over splits, bars: one sd)."""
    fig, panels = _settings(table, 6.4)
    for ax, setting in panels:
        t = table.filter(pl.col("setting") == setting)
        total = t.filter(pl.col("method") == "full")["params"][0]
        steps = (
            t.filter(pl.col("method") == "greedy_step")
            .group_by("step", maintain_order=True)
            .agg(
                (pl.col("params").mean() / total).alias("share"),
                pl.col(metric).mean().alias("m"),
                pl.col(metric).std().fill_null(0).alias("sd"),
            )
            .sort("step")
        )
        ax.errorbar(
            steps["share"],
            steps["m"],
            yerr=steps["sd"],
            fmt="-o",
            ms=3,
            capsize=2,
            color="tab:blue",
            label="greedy selection (held-out)",
        )
        chosen = t.filter(pl.col("method") == "greedy")
        ax.errorbar(
            [chosen["params"].mean() / total],
            [chosen[metric].mean()],
            yerr=[chosen[metric].std() or 0],
            fmt="*",
            ms=12,
            color="tab:blue",
            capsize=3,
            label="chosen prefix",
            zorder=5,
        )
        ax.axhline(t.filter(pl.col("method") == "full")[metric].mean(), ls="--", color="k", lw=1, label="full gradient")
        _metric_panel(ax, "share of parameters (log)", metric, f"{setting}: greedy selection")
        ax.legend(fontsize=7)
    _save(fig, path)
