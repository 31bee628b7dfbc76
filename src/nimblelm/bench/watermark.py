"""``nimblelm bench watermark``: SynthID-Text detectability and cost.

* TPR at a 1% false-positive rate vs text length (25, 50, 100, 200, 400 tokens) for the mean,
  weighted-mean and Bayesian detectors, at temperatures 0.7 and 1.0, with speculative
  decoding off (autoregressive) and on (``sps``, high-detectability mode, the default;
  ``--fast-rows`` adds sps in fast mode, where only bonus/correction tokens are watermarked).
  Thresholds are the calibrated ones (exact binomial for mean, normal with the exact variance
  for weighted mean, simulated null for Bayesian); the empirical FPR on unwatermarked texts
  of the same model is reported next to them. Each text is a prefix of one 400-token
  generation from a random prompt. The Bayesian detector is trained first on separate
  watermarked texts (both temperatures, autoregressive).
* Cost (``--plot`` / next to ``--json``: a PNG of TPR vs length): ms per generated token with and without the watermark (autoregressive, batch 1) and
  tau (tokens per target call) and tokens/s for ``sps`` without watermark, high-detectability
  and fast.

Model: ``--model DIR`` (a checkpoint; ``--drafter DIR`` its draft model) or, by default, a
random ``attention-tiny``-shaped model (vocab 1024) with weights scaled by
``--weight-scale`` (sharper, lower-entropy predictions than at init; the mean entropy of its
processed distributions is reported, since detectability depends on it), and as drafter a
copy of it with Gaussian noise of ``--drafter-noise`` times each weight's std added.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

import nimblelm as nl

from ..generation.sampling import SamplingConfig, probabilities
from ..generation.speculative.drafters import DraftModelDrafter
from ..generation.watermark import BayesianDetector, SynthID, detect, text_g_values
from .report import run_and_report

DETECTORS = ("mean", "weighted_mean", "bayesian")


def build_models(args) -> tuple[Any, Any]:
    if args.model:
        target = nl.load(args.model).float().eval()
        drafter = nl.load(args.drafter).float().eval() if args.drafter else None
        return target, drafter
    torch.manual_seed(args.seed)
    config = nl.ModelConfig.from_preset("attention-tiny", vocab_size=1024, max_seq_len=512)
    target = nl.LanguageModel(config).float().eval()
    with torch.no_grad():
        for p in target.parameters():
            if p.dim() >= 2:
                p.mul_(args.weight_scale)
    drafter = copy.deepcopy(target)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * p.std() * args.drafter_noise)
    return target, drafter


def prompts(count: int, vocab: int, seed: int, length: int = 8) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=gen).tolist()


def generate_texts(target, drafter, rows, length, temperature, config, spec: str, seed: int) -> list[list[int]]:
    """spec: "off" (autoregressive, one batched call: each row uses its own context) or the
    SynthID speculative mode for ``sps``."""
    if spec == "off":
        res = nl.generate(target, rows, max_new_tokens=length, temperature=temperature, watermark=config, seed=seed)
        return res.sequences()
    config = SynthID(keys=config.keys, ngram_len=config.ngram_len, speculative=spec)
    return [nl.generate(target, row, max_new_tokens=length, temperature=temperature, watermark=config,
                        strategy="sps", drafter=DraftModelDrafter(drafter), seed=seed + i).sequences()[0]
            for i, row in enumerate(rows)]


def flags(texts, config, bayes: BayesianDetector, length: int, fpr: float) -> dict[str, float]:
    """Fraction of texts (their first ``length`` tokens) flagged by each detector."""
    hits = dict.fromkeys(DETECTORS, 0)
    for text in texts:
        prefix = text[:length]
        hits["mean"] += detect(prefix, config, "mean", fpr).is_watermarked
        hits["weighted_mean"] += detect(prefix, config, "weighted_mean", fpr).is_watermarked
        g, mask = text_g_values(prefix, config)
        hits["bayesian"] += bayes.score(g, mask) > bayes.threshold(int(mask.sum()), fpr)
    return {k: v / len(texts) for k, v in hits.items()}


def mean_entropy(target, rows, temperature: float) -> float:
    with torch.no_grad():
        logits = target(torch.tensor(rows)).logits.double()
    p = probabilities(logits, SamplingConfig(temperature))
    return float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())


def time_generation(target, drafter, config, args) -> dict[str, Any]:
    """ms/token and tau for autoregressive and sps, without and with the watermark."""
    row = prompts(1, target.config.vocab_size, args.seed + 99)[0]
    cases = {"ar": ("autoregressive", None), "ar+wm": ("autoregressive", config),
             "sps": ("sps", None), "sps+wm(high_detectability)": ("sps", config),
             "sps+wm(fast)": ("sps", SynthID(keys=config.keys, speculative="fast"))}
    out = {}
    for name, (strategy, wm) in cases.items():
        if strategy == "sps" and drafter is None:
            continue
        times, taus = [], []
        for rep in range(args.repeats):
            start = time.perf_counter()
            res = nl.generate(target, row, max_new_tokens=args.timing_tokens, temperature=1.0, watermark=wm,
                              strategy=strategy, seed=rep,
                              drafter=DraftModelDrafter(drafter) if strategy == "sps" else None)
            times.append((time.perf_counter() - start) / res.lengths[0])
            taus.append(res.stats.accepted_per_call)
        out[name] = {"ms_per_token": 1e3 * statistics.median(times), "tau": statistics.mean(taus)}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    temps = [float(x) for x in args.temperatures.split(",")]
    if max(lengths) > 400 or min(lengths) < 1:
        raise ValueError("--lengths must be between 1 and 400 tokens")
    target, drafter = build_models(args)
    vocab, longest = target.config.vocab_size, max(lengths)
    config = SynthID(keys=[args.seed * 1000 + k for k in range(30)])
    train = []
    for t in temps:  # Bayesian training texts: separate prompts and seeds
        train += generate_texts(target, drafter, prompts(args.texts, vocab, args.seed + 7), longest, t, config, "off", 7)
    bayes = BayesianDetector(config.depth, null_samples=args.null_samples)
    bayes.fit([text_g_values(t, config) for t in train], steps=200)
    results: dict[str, Any] = {"model": args.model or "random attention-tiny (vocab 1024)", "texts": args.texts,
                               "fpr": args.fpr, "lengths": lengths, "rows": []}
    for t in temps:
        rows = prompts(args.texts, vocab, args.seed + int(100 * t))
        null = generate_texts(target, None, rows, longest, t, None, "off", 3)
        entropy = mean_entropy(target, [r + n[:8] for r, n in zip(rows, null)], t)
        modes = ["off"] + (["high_detectability"] + (["fast"] if args.fast_rows else []) if drafter is not None else [])
        for spec in modes:
            marked = generate_texts(target, drafter, rows, longest, t, config, spec, 11)
            for length in lengths:
                results["rows"].append({"temperature": t, "speculative": spec, "length": length, "entropy": entropy,
                                        "tpr": flags(marked, config, bayes, length, args.fpr),
                                        "fpr_empirical": flags(null, config, bayes, length, args.fpr)})
    results["timing"] = time_generation(target, drafter, config, args)
    plot = args.plot or (args.json and (args.json[:-5] if args.json.endswith(".json") else args.json) + ".png")
    results["plot"] = write_plot(results, plot) if plot else None
    return results


def write_plot(results: dict[str, Any], path: str) -> str | None:
    """TPR vs length, one panel per (temperature, speculative), one line per detector; None
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = sorted({(r["temperature"], r["speculative"]) for r in results["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, (temp, spec) in zip(axes[0], panels):
        rows = [r for r in results["rows"] if (r["temperature"], r["speculative"]) == (temp, spec)]
        for det in DETECTORS:
            ax.plot([r["length"] for r in rows], [r["tpr"][det] for r in rows], marker="o", label=det)
        ax.set_xscale("log")
        ax.set_xticks(results["lengths"], [str(n) for n in results["lengths"]])
        ax.minorticks_off()
        ax.set_title(f"T={temp}, speculative {spec}", fontsize=9)
        ax.set_xlabel("tokens")
    axes[0][0].set_ylabel(f"TPR at {results['fpr']:.0%} FPR")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(results: dict[str, Any]) -> str:
    lines = [f"SynthID-Text detection: TPR at {results['fpr']:.0%} FPR ({results['texts']} texts per row; "
             f"empirical FPR on unwatermarked texts in brackets) -- {results['model']}",
             f"{'temp':>5} {'speculative':>18} {'len':>4} {'entropy':>7} " + " ".join(f"{d:>18}" for d in DETECTORS)]
    for row in results["rows"]:
        cells = " ".join(f"{row['tpr'][d]:>8.2f} [{row['fpr_empirical'][d]:.2f}]".rjust(18) for d in DETECTORS)
        lines.append(f"{row['temperature']:>5.1f} {row['speculative']:>18} {row['length']:>4} "
                     f"{row['entropy']:>7.2f} {cells}")
    lines.append("cost (temperature 1.0, batch 1):")
    for name, t in results["timing"].items():
        lines.append(f"  {name:<28} {t['ms_per_token']:7.2f} ms/token   tau {t['tau']:.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimblelm bench watermark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", help="checkpoint to watermark (default: a random tiny model)")
    parser.add_argument("--drafter", metavar="DIR", help="draft model for --model (speculative rows need one)")
    parser.add_argument("--texts", type=int, default=12, help="texts per row (default 12)")
    parser.add_argument("--fast-rows", action="store_true", help="also rows for sps in the 'fast' watermark mode")
    parser.add_argument("--lengths", default="25,50,100,200,400")
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--weight-scale", type=float, default=30.0)
    parser.add_argument("--drafter-noise", type=float, default=0.03)
    parser.add_argument("--null-samples", type=int, default=1000, help="simulated null texts per length (Bayesian)")
    parser.add_argument("--timing-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--plot", metavar="FILE", help="PNG path (default: the --json path with .png)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return 0 if run_and_report(run, format_table, args) is not None else 2
