"""``nimblelm watermark detect --keys KEYFILE --tokenizer DIR FILE...``: score texts for a
SynthID watermark; one line per file (score, p-value, verdict) or ``--json``.

Keys come from ``--keys FILE`` or, without it, from the environment variable named by
``--keys-env`` (default ``NIMBLELM_WATERMARK_KEYS``). Either holds a JSON object
``{"keys": [int, ...], "ngram_len": 5, "num_competitors": 2, "eos_token_id": null}``
(only "keys" required), a JSON list of integers, or integers separated by whitespace or
commas. Keys are never printed or logged, and error messages never quote the key text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import SynthID, WatermarkError

DEFAULT_KEYS_ENV = "NIMBLELM_WATERMARK_KEYS"


def parse_keys(text: str, source: str) -> SynthID:
    """A SynthID config from key-file text; ``source`` names it in errors (never the text)."""
    text = text.strip()
    if not text:
        raise WatermarkError(f"{source} is empty; it must hold the watermark keys (a JSON list of integers)")
    options: dict = {}
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WatermarkError(f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"keys", "ngram_len", "num_competitors", "eos_token_id"})
            if "keys" not in data or unknown:
                raise WatermarkError(f"{source} must be a JSON object with a 'keys' list (optional: ngram_len, "
                                     f"num_competitors, eos_token_id)" + (f"; unknown fields {unknown}" if unknown else ""))
            options = {k: v for k, v in data.items() if k != "keys"}
            data = data["keys"]
        keys = data
    else:
        parts = text.replace(",", " ").split()
        try:
            keys = [int(p) for p in parts]
        except ValueError:
            raise WatermarkError(f"{source} must hold integers separated by spaces or commas, or JSON; "
                                 "found a non-integer entry") from None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
        raise WatermarkError(f"{source}: the keys must be a non-empty list of integers")
    try:
        return SynthID(keys=keys, **options)
    except TypeError:
        raise WatermarkError(f"{source}: bad option values") from None


def load_keys(path: str | None, env_name: str) -> SynthID:
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                return parse_keys(fh.read(), f"key file {path}")
        except (OSError, UnicodeDecodeError) as exc:
            raise WatermarkError(f"cannot read key file {path}: {type(exc).__name__}") from None
    text = os.environ.get(env_name)
    if text is None:
        raise WatermarkError(f"no keys: pass --keys FILE or set the environment variable {env_name}")
    return parse_keys(text, f"environment variable {env_name}")


def load_tokenizer(directory: str):
    from tokenizers import Tokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise WatermarkError(f"--tokenizer {directory}: no tokenizer.json there (a tokenizers-library file)")
    return Tokenizer.from_file(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimblelm watermark detect", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, one text each")
    parser.add_argument("--keys", metavar="KEYFILE", help="file with the watermark keys (see --help text)")
    parser.add_argument("--keys-env", default=DEFAULT_KEYS_ENV, metavar="NAME",
                        help=f"environment variable with the keys when --keys is not given (default {DEFAULT_KEYS_ENV})")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="directory with tokenizer.json")
    parser.add_argument("--detector", choices=["mean", "weighted_mean", "bayesian"], default="mean")
    parser.add_argument("--bayesian-file", metavar="FILE", help="trained BayesianDetector (JSON) for --detector bayesian")
    parser.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the verdict (default 0.01)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    return parser


def main(argv: list[str]) -> int:
    from .bayesian import BayesianDetector
    from .detect import detect

    args = build_parser().parse_args(argv)
    config = load_keys(args.keys, args.keys_env)
    tokenizer = load_tokenizer(args.tokenizer)
    detector = args.detector
    if detector == "bayesian":
        if not args.bayesian_file:
            raise WatermarkError("--detector bayesian needs --bayesian-file FILE (a trained detector)")
        detector = BayesianDetector.load(args.bayesian_file)
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise WatermarkError(f"cannot read {path}: {type(exc).__name__}") from None
        ids = tokenizer.encode(text).ids
        if not text.strip() or not ids:
            raise WatermarkError(f"{path} is empty; nothing to detect")
        result = detect(ids, config, detector=detector, fpr=args.fpr)
        verdict = "watermarked" if result.is_watermarked else "not watermarked"
        if args.json:
            print(json.dumps({"file": path, "tokens": len(ids), **result.as_dict(), "fpr": args.fpr}))
        else:
            print(f"{path}: score {result.score:.4f}  p-value {result.p_value:.3g}  {verdict} "
                  f"({result.scored_tokens} scored tokens, {result.detector}, fpr {args.fpr})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
