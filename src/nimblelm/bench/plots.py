"""PNG plots of the learning probes (MQAR, Markov). Needs matplotlib (the ``test`` extra);
without it every function returns [] and the benches still write their tables."""

from __future__ import annotations

import os
from collections import defaultdict


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _tasks(rows: list[dict]) -> list[tuple[int, int]]:
    return sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})


def _grid(plt, n: int, title: str):
    fig, axes = plt.subplots(1, n, figsize=(max(4.2 * n, 7.0), 3.8), squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def mqar_plots(rows: list[dict], out: str) -> list[str]:
    """Three PNGs from the best-per-setting rows of the MQAR sweep: accuracy vs d_model per
    mixer, accuracy vs decoding-state bytes (the Based paper's recall-memory plot) and decode
    throughput vs accuracy; one panel per (seq_len, kv_pairs). Returns the paths written."""
    plt = _pyplot()
    if plt is None or not rows:
        return []
    import matplotlib.pyplot as mpl

    tasks = _tasks(rows)
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    colors = {m: mpl.cm.tab20(i % 20) for i, m in enumerate(mixers)}
    specs = [("mqar_accuracy_vs_dmodel.png", "MQAR accuracy vs d_model", "d_model", "d_model", False),
             ("mqar_accuracy_vs_state.png", "MQAR accuracy vs decoding state (bytes, fp32, 1 sequence)",
              "state_bytes", "state bytes", True),
             ("mqar_throughput_vs_accuracy.png", "decode throughput (batch 1) vs MQAR accuracy",
              "decode_tokens_per_s", "decode tokens/s", True)]
    paths = []
    for name, title, xkey, xlabel, logx in specs:
        fig, axes = _grid(plt, len(tasks), title)
        for ax, (length, kv) in zip(axes, tasks):
            for m in mixers:
                pts = sorted((r[xkey], 100 * r["accuracy"]) for r in rows
                             if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == (length, kv)
                             and r.get(xkey) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[m], label=m, linestyle="-" if xkey == "d_model" else "")
            ax.set_title(f"seq_len {length}, {kv} kv pairs")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(-3, 103)
            if logx:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7, loc="best")
        paths.append(_save(fig, out, name))
        plt.close(fig)
    return paths


def markov_plot(rows: list[dict], out: str) -> list[str]:
    """One PNG: per (p, q) chain, each variant's test loss per seed (dots) and mean (bar),
    against the entropy rate (optimum) and the unigram loss (the bad local minimum), both as
    measured on the same test chains when the rows carry them."""
    plt = _pyplot()
    if plt is None or not rows:
        return []
    by_chain: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_chain[(r["p"], r["q"])].append(r)
    fig, axes = _grid(plt, len(by_chain), "Markov probe: test loss (nats) vs entropy rate and unigram loss")
    for ax, ((p, q), chain_rows) in zip(axes, sorted(by_chain.items())):
        variants = list(dict.fromkeys(r["variant"] for r in chain_rows))
        for i, v in enumerate(variants):
            losses = [r["test_loss"] for r in chain_rows if r["variant"] == v]
            ax.bar(i, sum(losses) / len(losses), color="C0", alpha=0.35)
            ax.scatter([i] * len(losses), losses, color="C0", s=14, zorder=3)
        first = chain_rows[0]  # references measured on the test chains (analytic ones as fallback)
        low = first.get("test_oracle_loss", first["entropy_rate"])
        high = first.get("test_unigram_loss", first["unigram_loss"])
        ax.axhline(low, color="C2", linestyle="--", label="entropy rate (true chain on test set)")
        ax.axhline(high, color="C3", linestyle=":", label="unigram loss (on test set)")
        ax.set_ylim(low - 0.6 * (high - low), high + 0.8 * (high - low))
        ax.set_xticks(range(len(variants)), variants, rotation=30, fontsize=8)
        ax.set_title(f"p={p}, q={q} (p+q={p + q:.2f})")
        ax.set_ylabel("test loss (nats)")
        ax.legend(fontsize=7)
    path = _save(fig, out, "markov_loss.png")
    plt.close(fig)
    return [path]
