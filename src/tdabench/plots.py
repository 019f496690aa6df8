"""Figures of the results table (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from tdabench.io import atomic_path  # noqa: E402


def plot_metric_vs_dim(table: pl.DataFrame, path: str | Path, metric: str = "top1") -> None:
    """Per setting: `metric` against representation dimension (log x) for select, project and full."""
    settings = table["setting"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(settings), figsize=(6.4 * len(settings), 4.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        t = table.filter(pl.col("setting") == setting)
        single = t.filter(pl.col("method") == "single")
        ax.scatter(single["dim"], single[metric], s=14, color="0.6", label="single component")
        greedy = t.filter(pl.col("method") == "greedy_step").sort("step")
        ax.plot(greedy["dim"], greedy[metric], "-o", ms=3, color="tab:blue", label="greedy selection (steps)")
        chosen = t.filter(pl.col("method") == "greedy")
        ax.scatter(chosen["dim"], chosen[metric], s=90, marker="*", color="tab:blue", zorder=5,
                   label="greedy (chosen prefix)")
        proj = (t.filter(pl.col("method") == "projection").group_by("k").agg(
            pl.col(metric).mean().alias("m"), pl.col(metric).min().alias("lo"),
            pl.col(metric).max().alias("hi")).sort("k"))
        if proj.height:
            ax.errorbar(proj["k"], proj["m"], yerr=[proj["m"] - proj["lo"], proj["hi"] - proj["m"]],
                        fmt="-s", ms=4, capsize=3, color="tab:orange", label="random projection (min-max over seeds)")
        full = t.filter(pl.col("method") == "full")
        ax.axhline(full[metric][0], ls="--", color="k", lw=1, label=f"full gradient (dim {full['dim'][0]:,})")
        chance = t.filter(pl.col("method") == "chance")
        ax.axhline(chance[metric][0], ls=":", color="tab:red", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("representation dimension (log)")
        ax.set_ylabel(metric)
        ax.set_title(f"{setting}: {metric} on held-out queries")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
