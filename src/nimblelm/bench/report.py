"""What every bench suite does after measuring: print the table, write ``--json``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Callable


def run_and_report(run: Callable[[argparse.Namespace], dict[str, Any]], format_table: Callable[[dict], str],
                   args: argparse.Namespace) -> dict[str, Any] | None:
    """Run a suite, print its table and write ``args.json`` if set. Returns the results, or
    None after printing a bad-option error (the caller exits with status 2)."""
    try:
        results = run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json}")
    return results


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none): noisy timings show here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What a benchmark's numbers depend on: CPU model and count, torch threads and versions."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": hf_version, "python": platform.python_version(),
            "flush_denormal": True, "loadavg_start": loadavg()}
