"""What every bench suite does after measuring: print the table, write ``--json``."""

from __future__ import annotations

import argparse
import json
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
