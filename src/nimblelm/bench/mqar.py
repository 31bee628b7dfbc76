"""``nimblelm bench mqar``: Zoology's multi-query associative recall benchmark for every mixer.

For each mixer x d_model x (seq_len, kv_pairs) the 2-layer Zoology model
(:mod:`nimblelm.bench.mqar_train`) is trained at each learning rate of ``--lrs`` (stopping
early at 99% test accuracy, and skipping the remaining learning rates once one reaches it) and
the best test accuracy over learning rates is reported, with the mixer's decoding state in
bytes (one sequence, fp32, after seq_len tokens) and its batch-1 decode throughput.

Full sweep (hours; resumable): every mixer x d_model {32, 64, 128} x (seq_len, kv) in
{(64, 4), (128, 8), (256, 16)} plus (64, 8), (64, 16)::

    nimblelm bench mqar --out results/mqar --json results/mqar/mqar.json --resume

Every finished run is appended to the JSON at once, so ``--resume`` continues where a killed
sweep stopped. ``--workers N --threads 1`` trains N settings at a time (one process each, so
the sweep scales with cores; every run is seeded, so the records are the single-process ones).
``--out`` gets ``mqar.md`` (the table) and PNG plots (:mod:`nimblelm.bench.plots`).
``--report --json A.json,B.json --out DIR`` renders sweeps run side by side (one JSON per
process) as one table, provided they share the training budget.
``--quick`` trains attention on a tiny MQAR (vocabulary 64) in seconds: the CI smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .mqar_data import check_sizes
from .mqar_train import MQARSetting, TrainOptions, decode_throughput, make_data, train_one
from .probe_train import write_json_atomic
from .report import run_and_report

MIXERS = ["attention", "local_attention", "linear_attn", "based", "retnet", "gla", "mamba", "mamba2", "rglru",
          "deltanet", "gated_deltanet", "ttt_linear"]
FULL = dict(mixers=",".join(MIXERS), d_models="32,64,128", tasks="64:4,128:8,256:16,64:8,64:16",
            lrs="1e-3,3e-3,1e-2", vocab_size=8192, num_train=100_000, num_test=3_000, batch_size=64,
            max_steps=6_000, time_limit=300.0, eval_every=200)
QUICK = dict(mixers="attention", d_models="32", tasks="16:2", lrs="1e-2", vocab_size=64, num_train=2_000,
             num_test=200, batch_size=32, max_steps=300, time_limit=20.0, eval_every=25)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nimblelm bench mqar", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="attention on a tiny MQAR, seconds (the CI smoke test)")
    p.add_argument("--json", metavar="FILE", help="results JSON (written after every run; --resume reads it); "
                   "with --report a comma-separated list of them, merged into one table")
    p.add_argument("--out", metavar="DIR", help="write mqar.md and the PNG plots into DIR")
    p.add_argument("--resume", action="store_true", help="skip runs already in --json (or DIR/mqar.json)")
    p.add_argument("--report", action="store_true",
                   help="no training: the table (and with --out the plots) of the runs already in --json")
    p.add_argument("--mixers", help=f"comma-separated mixers (default: {FULL['mixers']})")
    p.add_argument("--d-models", help=f"comma-separated widths (default {FULL['d_models']})")
    p.add_argument("--tasks", help=f"seq_len:kv_pairs list (default {FULL['tasks']})")
    p.add_argument("--lrs", help=f"learning rates swept (default {FULL['lrs']})")
    p.add_argument("--vocab-size", type=int, help="vocabulary (default 8192, Zoology's)")
    p.add_argument("--num-train", type=int, help="training examples per task (default 100000)")
    p.add_argument("--num-test", type=int, help="test examples per task (default 3000)")
    p.add_argument("--batch-size", type=int, help="batch size (default 64)")
    p.add_argument("--max-steps", type=int, help="cosine horizon in steps (default 6000)")
    p.add_argument("--time-limit", type=float, help="seconds per (model, lr) run (default 300)")
    p.add_argument("--eval-every", type=int, help="steps between test evaluations (default 200)")
    p.add_argument("--num-heads", type=int, default=2, help="heads of every mixer (default 2)")
    p.add_argument("--window", type=int, default=16, help="local_attention window (default 16)")
    p.add_argument("--mixer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an entry of ModelConfig.extra for the mixers under test, e.g. feature_map=identity "
                        "(repeatable; VALUE is read as JSON when it parses, else as a string); runs with "
                        "options are kept apart from runs without in the JSON and the table")
    p.add_argument("--all-lrs", action="store_true", help="run every lr even after one reached 99%%")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; per worker)")
    p.add_argument("--workers", type=int, default=1,
                   help="settings trained at a time, each in its own process (default 1); e.g. one per core "
                        "with --threads 1")
    p.add_argument("--seed", type=int, default=0)
    return p


def _list(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def resolve(args: argparse.Namespace) -> dict:
    """Options of the chosen mode with the command-line overrides, validated (ValueError)."""
    base = QUICK if args.quick else FULL
    o = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    from ..layers.registry import MIXERS as REGISTERED

    o["mixers"] = _list(o["mixers"], str, "mixers")
    unknown = [m for m in o["mixers"] if m not in REGISTERED]
    if unknown:
        raise ValueError(f"unknown mixer(s) {', '.join(unknown)}; known: {', '.join(sorted(REGISTERED))}")
    o["d_models"] = _list(o["d_models"], int, "d-models")
    o["lrs"] = _list(o["lrs"], float, "lrs")
    tasks = []
    for item in _list(o["tasks"], str, "tasks"):
        length, _, kv = item.partition(":")
        if not (length.isdigit() and kv.isdigit()):
            raise ValueError(f"--tasks items are seq_len:kv_pairs, got {item!r}")
        check_sizes(o["vocab_size"], int(length), int(kv))
        tasks.append((int(length), int(kv)))
    o["tasks"] = tasks
    o["mixer_options"] = parse_mixer_options(getattr(args, "mixer_option", None) or [])
    return o


def parse_mixer_options(items: list[str]) -> dict:
    """``["feature_map=identity", "expand=2"]`` -> ``{"feature_map": "identity", "expand": 2}`` (ValueError)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--mixer-option takes KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def mixer_label(run: dict) -> str:
    """The mixer's name, with its options when it ran with any: ``linear_attn[feature_map=identity]``."""
    options = run.get("mixer_options") or {}
    if not options:
        return run["mixer"]
    return run["mixer"] + "[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]"


def _options(o: dict, args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(vocab_size=o["vocab_size"], num_train=o["num_train"], num_test=o["num_test"],
                        batch_size=o["batch_size"], max_steps=o["max_steps"], time_limit_s=o["time_limit"],
                        eval_every=o["eval_every"], num_heads=args.num_heads, window=args.window, seed=args.seed,
                        extra=dict(o["mixer_options"]))


def _results_path(args: argparse.Namespace) -> str | None:
    if args.json:
        return args.json
    return os.path.join(args.out, "mqar.json") if args.out else None


def _load_previous(path: str | None, resume: bool) -> list[dict]:
    if not resume or path is None or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return json.load(fh).get("runs", [])


def _key(run: dict) -> tuple:
    """(mixer label, d_model, seq_len, kv, lr): what makes two runs the same run."""
    return mixer_label(run), run["d_model"], run["seq_len"], run["num_kv_pairs"], float(run["lr"])


def run_mqar(args: argparse.Namespace) -> dict:
    """The sweep; returns {"options", "runs" (every (setting, lr) run), "best" (one row per setting)}.
    With ``--out`` the table and plots are rewritten after every run, so a long sweep shows its
    progress; ``--report`` only renders the runs already in the JSON. ``--workers N`` trains N
    settings at a time in separate processes (``--threads`` each); the parent alone writes."""
    if getattr(args, "report", False):
        return _report_only(args)
    if args.json and "," in args.json:
        raise ValueError(f"--json takes one file when training (a comma-separated list is for --report), "
                         f"got {args.json!r}")
    workers = getattr(args, "workers", 1)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    o = resolve(args)
    torch.set_num_threads(args.threads)
    opts = _options(o, args)
    path = _results_path(args)
    runs = _load_previous(path, args.resume)
    results = {"options": {k: v for k, v in o.items()}, "runs": runs, "best": []}
    jobs = _jobs(o, opts, runs, args.all_lrs)
    bar = tqdm(total=sum(len(j.lrs) for j in jobs), desc="mqar", file=sys.stderr, disable=args.quick)

    def record(new: list[dict]) -> None:  # the parent's only write path: JSON, table, plots
        runs.extend(new)
        results["best"] = best_rows(runs)
        if path:
            write_json_atomic(path, results)
        if args.out:
            write_outputs(results, args.out)

    if workers == 1:
        data_cache: dict[tuple, tuple] = {}
        for job in jobs:
            task = (job.setting.seq_len, job.setting.num_kv_pairs)
            if task not in data_cache:
                data_cache.clear()
                data_cache[task] = make_data(job.setting, opts)
            run_job(job, data_cache[task], bar, on_record=lambda r: record([r]))
    else:
        _run_in_workers(jobs, workers, args.threads, bar, record)
    bar.close()
    results["best"] = best_rows(runs)
    if args.out:
        write_outputs(results, args.out)
    return results


@dataclass
class Job:
    """One setting of the sweep with the learning rates still to run, tried in order; once one
    reaches the target accuracy the rest are skipped unless ``all_lrs``. (A setting solved by
    an earlier run gets no job unless ``all_lrs``.) The mixer options are ``opts.extra``."""

    setting: MQARSetting
    lrs: list[float]
    opts: TrainOptions
    all_lrs: bool


def _jobs(o: dict, opts: TrainOptions, runs: list[dict], all_lrs: bool) -> list[Job]:
    """The settings in sweep order (task, then d_model, then mixer) that have runs left to do."""
    done = {_key(r) for r in runs}
    jobs = []
    for (length, kv) in o["tasks"]:
        for d in o["d_models"]:
            for m in o["mixers"]:
                setting = MQARSetting(m, d, length, kv)
                this = {**vars(setting), "mixer_options": o["mixer_options"]}
                setting_key = _key({**this, "lr": 0.0})[:4]
                solved = any(r["accuracy"] >= opts.target_accuracy for r in runs if _key(r)[:4] == setting_key)
                lrs = [float(lr) for lr in o["lrs"] if _key({**this, "lr": float(lr)}) not in done]
                if lrs and not (solved and not all_lrs):
                    jobs.append(Job(setting, lrs, opts, all_lrs))
    return jobs


def run_job(job: Job, data: tuple, progress=None, on_record=None) -> list[dict]:
    """Train ``job``'s learning rates in order (see `Job`); returns the new records, passing
    each to ``on_record`` as soon as it exists."""
    records, solved = [], False
    for lr in job.lrs:
        if solved and not job.all_lrs:
            if progress is not None:
                progress.update(1)
            continue
        rec = train_one(job.setting, lr, job.opts, data, progress=progress)
        rec["decode_tokens_per_s"] = round(decode_throughput(job.setting, job.opts), 1)
        if job.opts.extra:
            rec["mixer_options"] = dict(job.opts.extra)
        solved = solved or rec["accuracy"] >= job.opts.target_accuracy
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        if progress is not None:
            progress.update(1)
    return records


def _worker_job(job_and_threads: tuple[Job, int]) -> tuple[int, list[dict]]:
    """In a worker process: one job, with its own data (seeded, so equal to the parent's).
    Returns (learning rates it accounts for, new records)."""
    from ..native.allocator import configure_from_environment

    job, threads = job_and_threads
    configure_from_environment()
    torch.set_num_threads(threads)
    return len(job.lrs), run_job(job, make_data(job.setting, job.opts))


def _run_in_workers(jobs: list[Job], workers: int, threads: int, bar, record) -> None:
    """``jobs`` over a pool of ``workers`` spawned processes; each finished job's records reach
    ``record`` in the parent (a job cut off by an interruption is run again on --resume)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    with ctx.Pool(processes=min(workers, max(1, len(jobs)))) as pool:
        for tried, new in pool.imap_unordered(_worker_job, [(job, threads) for job in jobs]):
            record(new)  # in the order the jobs finish
            bar.update(tried)


# what makes two sweeps' accuracies comparable (the mixers, widths, tasks and lrs may differ)
BUDGET_OPTIONS = ("vocab_size", "num_train", "num_test", "batch_size", "max_steps", "eval_every")


def _report_only(args: argparse.Namespace) -> dict:
    """``--report``: the results of earlier (or still running) sweeps, from their JSON files
    (only read: a running sweep keeps writing its file). Several files (``--json A,B``, e.g.
    sweeps run side by side on separate cores) are merged into one table when they were
    trained on the same budget (`BUDGET_OPTIONS`); otherwise ValueError names the difference."""
    path = _results_path(args)
    paths = [p.strip() for p in (path or "").split(",") if p.strip()]
    missing = [p for p in paths if not os.path.exists(p)]
    if not paths or missing:
        raise ValueError(f"--report reads the runs of --json FILE[,FILE...] (or --out DIR/mqar.json); "
                         f"{', '.join(missing) or 'none given'} does not exist")
    options, runs, first = {}, [], None
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            saved = json.load(fh)
        budget = {k: saved.get("options", {}).get(k) for k in BUDGET_OPTIONS}
        if first is None:
            options, first = saved.get("options", {}), (p, budget)
        differ = [k for k in BUDGET_OPTIONS if budget[k] != first[1][k]]
        if differ:
            k = differ[0]
            raise ValueError(f"{p} was trained with {k}={budget[k]} but {first[0]} with {k}={first[1][k]}: "
                             "their accuracies are not comparable; report them separately")
        runs.extend(saved.get("runs", []))
    if len(paths) > 1:
        options = {**{k: options.get(k) for k in BUDGET_OPTIONS}, "merged_from": paths}
    results = {"options": options, "runs": runs, "best": best_rows(runs)}
    if args.out:
        write_outputs(results, args.out)
    return results


def best_rows(runs: list[dict]) -> list[dict]:
    """One row per (mixer label, d_model, seq_len, kv): the run with the best accuracy over learning
    rates; a row's "mixer" is the label (with the mixer options it ran with, if any)."""
    best: dict[tuple, dict] = {}
    for r in runs:
        key = _key(r)[:4]
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    rows = [{**{k: v for k, v in r.items() if k != "curve"}, "mixer": mixer_label(r), "base_mixer": r["mixer"]}
            for r in best.values()]
    return sorted(rows, key=lambda r: (r["seq_len"], r["num_kv_pairs"], r["d_model"], _mixer_order(r["base_mixer"]),
                                       r["mixer"]))


def format_table(results: dict) -> str:
    """Markdown table of the best run per setting."""
    head = ("| mixer | d_model | seq_len | kv | accuracy | best lr | steps | s | state bytes | decode tok/s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in results["best"]:
        lines.append(f"| {r['mixer']} | {r['d_model']} | {r['seq_len']} | {r['num_kv_pairs']} | "
                     f"{100 * r['accuracy']:.1f}% | {r['lr']:g} | {r['steps']} | {r['seconds']:.0f} | "
                     f"{r['state_bytes']} | {r.get('decode_tokens_per_s', float('nan')):.0f} |")
    return "\n".join(lines)


def format_grid(results: dict) -> str:
    """Markdown accuracy matrix of the best runs: one row per mixer label, one column per
    (seq_len, kv) task and d_model, in `best_rows`' order (task, then d_model); a setting
    with no run is "-". The full table (`format_table`) has the rest of each run."""
    best = results["best"]
    columns = list(dict.fromkeys(((r["seq_len"], r["num_kv_pairs"]), r["d_model"]) for r in best))
    labels = list(dict.fromkeys(r["mixer"] for r in sorted(best, key=lambda r: _mixer_order(r["base_mixer"]))))
    cell = {(r["mixer"], (r["seq_len"], r["num_kv_pairs"]), r["d_model"]): r["accuracy"] for r in best}
    lines = ["| mixer | " + " | ".join(f"{L}:{K} d{d}" for (L, K), d in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for m in labels:
        accs = [cell.get((m, t, d)) for t, d in columns]
        lines.append(f"| {m} | " + " | ".join("-" if a is None else f"{100 * a:.1f}" for a in accs) + " |")
    return "\n".join(lines)


def _mixer_order(mixer: str) -> int:
    return MIXERS.index(mixer) if mixer in MIXERS else len(MIXERS)


def write_outputs(results: dict, out: str) -> None:
    """DIR/mqar.md (the accuracy matrix, then the full table) and the PNG plots (when
    matplotlib is importable)."""
    from . import plots

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mqar.md"), "w", encoding="utf-8") as fh:
        fh.write("Test accuracy (%), best over learning rates; columns seq_len:kv d_model.\n\n")
        fh.write(format_grid(results) + "\n\n" + format_table(results) + "\n")
    results["plots"] = plots.mqar_plots(results["best"], out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        try:
            results = _report_only(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_table(results))
    else:
        results = run_and_report(run_mqar, format_table, args)
        if results is None:
            return 2
    for name in results.get("plots", []):
        print(f"plot: {name}")
    return 0
