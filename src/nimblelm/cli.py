"""The ``nimblelm`` command line. User errors print one line ``nimblelm: error: ...`` and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .errors import NimbleError
from .native.allocator import configure_from_environment

BENCH_SUITES = {"decode": "nimblelm.bench.decode", "mixers": "nimblelm.bench.mixers", "spec": "nimblelm.bench.spec",
                "mqar": "nimblelm.bench.mqar", "markov": "nimblelm.bench.markov",
                "watermark": "nimblelm.bench.watermark"}
# Command groups whose subcommands live in their own modules: each module has
# ``main(argv: list[str]) -> int`` and its own argparse parser (``--help`` works there).
MODULE_COMMANDS = {
    "train": ("build the corpus, train a language model or drafter heads (nimblelm train {corpus,lm,drafter} --help)",
              {"corpus": "nimblelm.training.corpus", "lm": "nimblelm.training.train_lm",
               "drafter": "nimblelm.training.train_drafter"}),
    "watermark": ("SynthID-Text watermark tools (nimblelm watermark detect --help)",
                  {"detect": "nimblelm.generation.watermark.cli"}),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimblelm", description="Efficient language models and lossless speculative decoding.")
    parser.add_argument("--version", action="version", version=f"nimblelm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="checkpoint directory written by model.save()")
    source.add_argument("--preset", metavar="NAME", help="a randomly initialised model of a named preset")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (UTF-8 bytes as ids when the model has no tokenizer)")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="comma- or space-separated token ids")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--strategy", default="autoregressive")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (and weight seed for --preset)")
    gen.add_argument("--stop-token", type=int, action="append", help="token id that ends generation (repeatable)")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")

    info = sub.add_parser("info", help="describe a checkpoint directory")
    info.add_argument("model", metavar="DIR")

    bench = sub.add_parser("bench", help="run a benchmark suite (each takes --json FILE)")
    bench.add_argument("suite", choices=sorted(BENCH_SUITES))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the suite (see nimblelm bench SUITE --help)")
    demo = sub.add_parser("demo", help="the shipped code model with every decoding strategy (nimblelm demo --help)",
                          add_help=False)
    demo.add_argument("args", nargs=argparse.REMAINDER)
    for name, (help_text, targets) in MODULE_COMMANDS.items():
        group = sub.add_parser(name, help=help_text)
        group.add_argument("what", choices=sorted(targets))
        group.add_argument("args", nargs=argparse.REMAINDER, help=f"options (see nimblelm {name} WHAT --help)")
    return parser


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise NimbleError(f"--prompt-ids must be integers separated by commas or spaces, got {text!r}") from None


def _load(args):
    import torch

    import nimblelm as nl

    if args.model:
        return nl.load(args.model)
    config = nl.ModelConfig.from_preset(args.preset)
    torch.manual_seed(args.seed)
    return nl.LanguageModel(config).eval()


def cmd_generate(args) -> int:
    import nimblelm as nl

    from .tokenization import decode_tokens, encode_text

    model = _load(args)
    ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else encode_text(model, args.prompt)
    if not ids:
        raise NimbleError("the prompt is empty; pass a non-empty --prompt or --prompt-ids")
    result = nl.generate(model, ids, max_new_tokens=args.max_new_tokens, strategy=args.strategy,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         stop_tokens=args.stop_token)
    new = result.sequences()[0]
    stats = result.stats
    if args.json:
        print(json.dumps({"prompt_ids": ids, "tokens": new, "text": decode_tokens(model, new), "stats": stats.as_dict()}))
        return 0
    if args.prompt is not None:
        print(args.prompt + decode_tokens(model, new))
    else:
        print(" ".join(map(str, new)))
    print(f"[{len(new)} tokens, {stats.tokens_per_s:.1f} tokens/s, {stats.target_calls} target calls, "
          f"strategy {args.strategy}]", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import nimblelm as nl

    model = nl.load(args.model)
    cfg = model.config
    print(f"checkpoint: {os.path.abspath(args.model)}")
    print(f"parameters: {model.num_parameters():,}")
    print(f"layers: {cfg.num_layers}  hidden: {cfg.hidden_size}  heads: {cfg.num_heads} (kv {cfg.num_kv_heads})  "
          f"vocab: {cfg.vocab_size}  context: {cfg.max_seq_len}")
    print(f"mixers: {', '.join(cfg.layer_mixers())}")
    print(f"ffns: {', '.join(cfg.layer_ffns())}")
    print(f"tokenizer: {'yes' if model.tokenizer is not None else 'no'}")
    return 0


def cmd_bench(args) -> int:
    import importlib

    module = importlib.import_module(BENCH_SUITES[args.suite])
    return module.main(args.args)


def cmd_demo(args) -> int:
    from . import demo

    return demo.main(args.args)


def cmd_module(args) -> int:
    import importlib

    module = importlib.import_module(MODULE_COMMANDS[args.command][1][args.what])
    return module.main(args.args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # all of the demo's options (--help included) belong to nimblelm.demo
        argv = ["demo", "--", *argv[1:]]
    args = _build_parser().parse_args(argv)
    configure_from_environment()  # glibc keeps freed memory: no page faults on every temporary
    if getattr(args, "args", None) and args.args[:1] == ["--"]:
        args.args = args.args[1:]
    handlers = {"generate": cmd_generate, "info": cmd_info, "bench": cmd_bench, "demo": cmd_demo}
    try:
        return handlers.get(args.command, cmd_module)(args)
    except (NimbleError, FileNotFoundError, NotImplementedError) as exc:
        print(f"nimblelm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nimblelm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
