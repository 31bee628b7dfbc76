"""``nimblelm bench markov``: the Attention-with-Markov probe (Makkuva et al. 2024).

Data: first-order binary Markov chains with switching probabilities p = P(1 | 0) and
q = P(0 | 1), started from the stationary distribution pi = (q, p) / (p + q). The best
possible next-token loss is the chain's entropy rate (q h(p) + p h(q)) / (p + q) (h: binary
entropy, nats); a model that ignores the context and predicts pi everywhere gets the unigram
loss h(p / (p + q)). The paper's finding: a 1-layer single-head transformer with the
embedding tied to the output head can get stuck at the unigram "bad local minimum" when
p + q > 1, while untying the embeddings or adding a second layer escapes it.

Variants (nimblelm LanguageModel, ``d_model`` wide, one head, a GELU MLP after the mixer):
``tied-1L``, ``untied-1L``, ``tied-2L`` (attention) and ``recurrent-1L`` (tied, the
``--recurrent-mixer`` instead of attention). Each is trained with AdamW + cosine decay on
fresh chains every step, for several seeds, and evaluated on held-out chains; the table reports
test loss, entropy rate, unigram loss and the fraction of the unigram-to-optimum gap closed
(1 = optimal, 0 = the unigram minimum), both measured on the test chains themselves.
``--arch paper`` trains the paper's own model instead (:mod:`nimblelm.bench.markov_model`: binary
embedding x e + p_n, no normalisation, sigmoid readout tied to e), to tell apart what the
finding owes to that architecture. ``--out DIR`` writes markov.md and markov_loss.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.config import ModelConfig
from ..models.lm import LanguageModel
from .markov_model import PaperMarkovModel
from .probe_train import Deadline, HorizonFit, make_optimizer, write_json_atomic
from .report import run_and_report

VARIANTS = {  # name -> (num_layers, tie_embeddings, mixer; None = attention)
    "tied-1L": (1, True, None), "untied-1L": (1, False, None), "tied-2L": (2, True, None),
    "recurrent-1L": (1, True, "recurrent"),
}
FULL = dict(chains="0.2:0.3,0.5:0.8", variants=",".join(VARIANTS), seeds=3, d_model=16, seq_len=128,
            batch_size=32, steps=1500, lr=3e-3, num_test=512, time_limit=120.0)
QUICK = dict(chains="0.2:0.3", variants="tied-1L", seeds=1, d_model=16, seq_len=64, batch_size=32, steps=200,
             lr=1e-2, num_test=256, time_limit=20.0)


def binary_entropy(p: float) -> float:
    """h(p) in nats (0 at p in {0, 1})."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log(p) + (1 - p) * math.log(1 - p))


def entropy_rate(p: float, q: float) -> float:
    """Entropy rate of the stationary chain, nats per token: the optimal next-token loss."""
    return (q * binary_entropy(p) + p * binary_entropy(q)) / (p + q)


def unigram_loss(p: float, q: float) -> float:
    """Cross-entropy of predicting the stationary distribution pi at every position."""
    return binary_entropy(p / (p + q))


def sample_chains(num: int, length: int, p: float, q: float, rng: np.random.Generator) -> torch.Tensor:
    """[num, length] int64 in {0, 1}: x_0 ~ pi, then x_{t+1} flips x_t with probability p (from 0) or q (from 1)."""
    if not (0 < p < 1 and 0 < q < 1):
        raise ValueError(f"switching probabilities must lie in (0, 1), got p={p}, q={q}")
    x = np.empty((num, length), dtype=np.int64)
    x[:, 0] = rng.random(num) < p / (p + q)
    flips = rng.random((num, length - 1))
    for t in range(1, length):
        switch = np.where(x[:, t - 1] == 0, p, q)
        x[:, t] = np.where(flips[:, t - 1] < switch, 1 - x[:, t - 1], x[:, t - 1])
    return torch.from_numpy(x)


def reference_losses(chains: torch.Tensor, p: float, q: float) -> tuple[float, float]:
    """(oracle, unigram) cross-entropy ON these chains: the true transition probabilities, and
    the stationary distribution at every position. The same predictions as the model's
    (chains[:, 1:] from chains[:, :-1]), so the finite-sample noise of the test set cancels."""
    prev, nxt = chains[:, :-1].double(), chains[:, 1:].double()
    p_one = torch.where(prev == 0, torch.tensor(p, dtype=torch.float64), torch.tensor(1 - q, dtype=torch.float64))
    oracle = -(nxt * p_one.log() + (1 - nxt) * (1 - p_one).log()).mean()
    pi_one = p / (p + q)
    unigram = -(nxt * math.log(pi_one) + (1 - nxt) * math.log(1 - pi_one)).mean()
    return float(oracle), float(unigram)


@dataclass
class MarkovRun:
    p: float
    q: float
    variant: str
    seed: int


def markov_config(variant: str, d_model: int, seq_len: int, recurrent_mixer: str) -> ModelConfig:
    layers, tied, mixer = VARIANTS[variant]
    mixer = "attention" if mixer is None else recurrent_mixer
    return ModelConfig(vocab_size=2, hidden_size=d_model, num_layers=layers, num_heads=1, mixer_pattern=[mixer],
                       ffn_pattern=["mlp"], max_seq_len=seq_len, tie_embeddings=tied, chunk_size=min(64, seq_len),
                       extra={"mamba_head_dim": min(64, 2 * d_model)})


def build_model(variant: str, opts: dict) -> torch.nn.Module:
    """A nimblelm LanguageModel (``arch="nimblelm"``) or the paper's model (``"paper"``)."""
    if opts.get("arch", "nimblelm") == "nimblelm":
        return LanguageModel(markov_config(variant, opts["d_model"], opts["seq_len"], opts["recurrent_mixer"]))
    layers, tied, mixer = VARIANTS[variant]
    if mixer is not None:
        raise ValueError(f"--arch paper has attention variants only, not {variant!r}")
    return PaperMarkovModel(opts["d_model"], opts["seq_len"], layers, tied)


def next_token_loss(model: torch.nn.Module, chains: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting chains[:, 1:] from chains[:, :-1] (every position)."""
    out = model(chains[:, :-1])
    logits = out if isinstance(out, torch.Tensor) else out.logits  # [B, T-1, 2]
    return F.cross_entropy(logits.reshape(-1, 2), chains[:, 1:].reshape(-1))


def train_markov(run: MarkovRun, opts: dict, progress=None) -> dict:
    """Train one variant on one chain with one seed; returns the record of the table."""
    rng = np.random.default_rng(1000 + run.seed)
    test = sample_chains(opts["num_test"], opts["seq_len"], run.p, run.q, np.random.default_rng(7))
    torch.manual_seed(run.seed)
    model = build_model(run.variant, opts)
    optimizer, scheduler, schedule = make_optimizer(model, opts["lr"], opts["weight_decay"], opts["steps"],
                                                    warmup_steps=min(50, opts["steps"] // 10))
    deadline, step = Deadline(opts["time_limit"]), 0
    horizon = HorizonFit(deadline)
    while step < schedule.total_steps and not deadline.expired():
        loss = next_token_loss(model, sample_chains(opts["batch_size"], opts["seq_len"], run.p, run.q, rng))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        horizon.update(step, schedule, opts["steps"])  # fit the cosine horizon into the time budget
        if progress is not None and step % 50 == 0:
            progress.set_postfix_str(f"{run.variant} p={run.p} q={run.q} seed={run.seed} loss={float(loss.detach()):.4f}")
    model.eval()
    with torch.no_grad():
        test_loss = float(next_token_loss(model, test))
    oracle, unigram = reference_losses(test, run.p, run.q)
    label = run.variant if opts.get("arch", "nimblelm") == "nimblelm" else f"paper:{run.variant}"
    return dict(p=run.p, q=run.q, variant=label, seed=run.seed, test_loss=test_loss,
                entropy_rate=entropy_rate(run.p, run.q), unigram_loss=unigram_loss(run.p, run.q),
                test_oracle_loss=oracle, test_unigram_loss=unigram,
                gap_closed=(unigram - test_loss) / (unigram - oracle), steps=step,
                seconds=round(deadline.elapsed(), 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nimblelm bench markov", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one chain, tied 1-layer, one seed: seconds (CI)")
    p.add_argument("--json", metavar="FILE", help="write every run to FILE")
    p.add_argument("--out", metavar="DIR", help="write markov.md and markov_loss.png into DIR")
    p.add_argument("--resume", action="store_true", help="skip runs already in --json")
    p.add_argument("--chains", help=f"p:q list (default {FULL['chains']})")
    p.add_argument("--variants", help=f"comma-separated (default {FULL['variants']})")
    p.add_argument("--seeds", type=int, help="seeds per (chain, variant) (default 3)")
    p.add_argument("--d-model", type=int, help="width (default 16)")
    p.add_argument("--seq-len", type=int, help="chain length (default 128)")
    p.add_argument("--batch-size", type=int, help="chains per step (default 32)")
    p.add_argument("--steps", type=int, help="training steps (default 1500)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--num-test", type=int, help="held-out chains (default 512)")
    p.add_argument("--time-limit", type=float, help="seconds per run (default 120)")
    p.add_argument("--arch", choices=["nimblelm", "paper"], default="nimblelm",
                   help="nimblelm's LanguageModel, or the paper's model (markov_model.py; no norm, binary embedding)")
    p.add_argument("--recurrent-mixer", default="gla", help="mixer of the recurrent-1L variant (default gla)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return p


def resolve(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else FULL
    o = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    o["weight_decay"], o["recurrent_mixer"], o["arch"] = args.weight_decay, args.recurrent_mixer, args.arch
    chains = []
    for item in str(o["chains"]).split(","):
        try:
            p, q = (float(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"--chains items are p:q, got {item!r}") from None
        if not (0 < p < 1 and 0 < q < 1):
            raise ValueError(f"--chains: p and q must lie in (0, 1), got {item!r}")
        chains.append((p, q))
    o["chains"] = chains
    o["variants"] = [v for v in str(o["variants"]).split(",") if v]
    unknown = [v for v in o["variants"] if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if o["arch"] == "paper" and any(VARIANTS[v][2] is not None for v in o["variants"]):
        raise ValueError("--arch paper builds attention models only; drop recurrent-1L from --variants")
    return o


def run_markov(args: argparse.Namespace) -> dict:
    o = resolve(args)
    torch.set_num_threads(args.threads)
    previous = []
    if args.resume and args.json and os.path.exists(args.json):
        import json

        with open(args.json, encoding="utf-8") as fh:
            previous = json.load(fh).get("runs", [])
    prefix = "" if o["arch"] == "nimblelm" else "paper:"
    done = {(r["p"], r["q"], r["variant"], r["seed"]) for r in previous}
    todo = [MarkovRun(p, q, v, s) for (p, q) in o["chains"] for v in o["variants"] for s in range(o["seeds"])]
    runs = list(previous)
    bar = tqdm(todo, desc="markov", file=sys.stderr, disable=args.quick)
    for run in bar:
        if (run.p, run.q, prefix + run.variant, run.seed) not in done:
            runs.append(train_markov(run, o, progress=bar))
            if args.json:
                write_json_atomic(args.json, {"runs": runs})
    results = {"options": {k: v for k, v in o.items()}, "runs": runs, "summary": summarize(runs)}
    if args.out:
        from . import plots

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "markov.md"), "w", encoding="utf-8") as fh:
            fh.write(format_table(results) + "\n")
        results["plots"] = plots.markov_plot(runs, args.out)
    return results


def summarize(runs: list[dict], stuck_below: float = 0.25) -> list[dict]:
    """Per (p, q, variant): mean/min/max test loss over seeds and how many seeds stayed at the
    unigram minimum (closed less than ``stuck_below`` of the unigram-to-optimum gap)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["p"], r["q"], r["variant"]), []).append(r)
    rows = []
    for (p, q, variant), rs in groups.items():
        losses = [r["test_loss"] for r in rs]
        rows.append(dict(p=p, q=q, variant=variant, seeds=len(rs), mean_loss=sum(losses) / len(rs),
                         min_loss=min(losses), max_loss=max(losses), entropy_rate=rs[0]["entropy_rate"],
                         test_oracle_loss=rs[0]["test_oracle_loss"], test_unigram_loss=rs[0]["test_unigram_loss"],
                         unigram_loss=rs[0]["unigram_loss"],
                         mean_gap_closed=sum(r["gap_closed"] for r in rs) / len(rs),
                         stuck=sum(r["gap_closed"] < stuck_below for r in rs)))
    return rows


def format_table(results: dict) -> str:
    lines = ["| p | q | p+q | variant | seeds | test loss mean (min..max) | entropy rate (test oracle) "
             "| unigram loss (on test) | gap closed | stuck at unigram |",
             "|---:|---:|---:|---|---:|---|---|---|---:|---:|"]
    for r in results["summary"]:
        lines.append(f"| {r['p']} | {r['q']} | {r['p'] + r['q']:.2f} | {r['variant']} | {r['seeds']} | "
                     f"{r['mean_loss']:.4f} ({r['min_loss']:.4f}..{r['max_loss']:.4f}) | "
                     f"{r['entropy_rate']:.4f} ({r['test_oracle_loss']:.4f}) | "
                     f"{r['unigram_loss']:.4f} ({r['test_unigram_loss']:.4f}) | {r['mean_gap_closed']:.2f} | {r['stuck']}/{r['seeds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run_and_report(run_markov, format_table, args)
    if results is None:
        return 2
    for name in results.get("plots", []):
        print(f"plot: {name}")
    return 0
