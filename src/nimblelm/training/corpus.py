"""The code corpus: the CPython standard library sources on this machine, split BY FILE into
train / validation / held-out test, a byte-level BPE tokenizer trained on the train split,
and the token streams as flat uint16 arrays.

``nimblelm train corpus --out data/code`` writes::

    data/code/tokenizer.json                 byte-level BPE (vocab 8192, <|endoftext|> = 0)
    data/code/{train,val,test}.bin           uint16 token ids, files joined by <|endoftext|>
    data/code/{train,val,test}.files.txt     which source files went where (relative paths)
    data/code/corpus.json                    source, counts, split rule
    data/code/prompts.json                   prompts cut from held-out files (for bench spec / demo)

The split is a pure function of each file's path relative to the stdlib root (sha256 of it,
mod 100: < 90 train, < 95 validation, else test), so it is the same on every machine with
the same Python version, and held-out files are never trained on. Files that are not valid
UTF-8 are read with replacement characters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sysconfig

import numpy as np

from ..errors import NimbleError

EOS_TOKEN = "<|endoftext|>"
SPLITS = ("train", "val", "test")
SKIP_DIRS = {"site-packages", "__pycache__", "lib2to3", "dist-packages"}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def split_of(relative_path: str) -> str:
    """Deterministic split by file: ~90% train, ~5% val, ~5% test."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def source_files(root: str, include_tests: bool = True) -> list[str]:
    """Relative paths of the .py files under ``root``, sorted (site-packages excluded)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = set(rel_dir.split(os.sep))
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        if not include_tests and (parts & {"test", "tests", "idle_test"}):
            continue
        found += [os.path.normpath(os.path.join(rel_dir, f)) for f in filenames if f.endswith(".py")]
    return sorted(found)


def read_source(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int = 8192):
    """A byte-level BPE tokenizer (every byte representable; ``<|endoftext|>`` is id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_split(tokenizer, texts: list[str]) -> np.ndarray:
    """Concatenate the texts' ids, each file followed by <|endoftext|>, as uint16."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    if tokenizer.get_vocab_size() > 65536:
        raise NimbleError("vocabularies over 65536 tokens do not fit the uint16 corpus format")
    return np.asarray(ids, dtype=np.uint16)


def build_corpus(out_dir: str, source: str | None = None, vocab_size: int = 8192, include_tests: bool = True) -> dict:
    """Build the corpus directory (see the module docstring); returns corpus.json's content."""
    source = source or stdlib_dir()
    if not os.path.isdir(source):
        raise NimbleError(f"source directory {source!r} does not exist; pass --source DIR with .py files")
    files = source_files(source, include_tests)
    if not files:
        raise NimbleError(f"no .py files under {source!r}")
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in files:
        by_split[split_of(rel)].append(rel)
    texts = {s: [read_source(os.path.join(source, rel)) for rel in by_split[s]] for s in SPLITS}
    tokenizer = train_tokenizer(texts["train"], vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    info = {"source": source, "vocab_size": tokenizer.get_vocab_size(), "eos_id": tokenizer.token_to_id(EOS_TOKEN),
            "split_rule": "sha256(relative path) % 100: <90 train, <95 val, else test",
            "include_tests": include_tests, "splits": {}}
    for split in SPLITS:
        ids = encode_split(tokenizer, texts[split])
        _write_atomic(os.path.join(out_dir, f"{split}.bin"), ids.tobytes())
        _write_atomic(os.path.join(out_dir, f"{split}.files.txt"), "\n".join(by_split[split]).encode() + b"\n")
        info["splits"][split] = {"files": len(by_split[split]), "tokens": int(ids.size),
                                 "bytes": sum(len(t.encode("utf-8")) for t in texts[split])}
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    prompts = heldout_prompts(source, by_split["test"])
    _write_atomic(os.path.join(out_dir, "prompts.json"), (json.dumps(prompts, indent=1) + "\n").encode())
    info["heldout_prompts"] = len(prompts)
    _write_atomic(os.path.join(out_dir, "corpus.json"), (json.dumps(info, indent=2) + "\n").encode())
    return info


def heldout_prompts(source: str, test_files: list[str], count: int = 24, context_lines: int = 30,
                    min_rest_lines: int = 40) -> list[dict]:
    """Prompts for the figures, from held-out (test split) files only: in each file, the first
    ``def`` line at least a third of the way in with ``min_rest_lines`` lines after it; the
    prompt is the ``context_lines`` lines before it plus the ``def`` line. Deterministic."""
    prompts = []
    for rel in sorted(test_files):
        lines = read_source(os.path.join(source, rel)).splitlines(keepends=True)
        for i in range(max(context_lines, len(lines) // 3), len(lines) - min_rest_lines):
            if lines[i].lstrip().startswith("def ") and lines[i].rstrip().endswith(":"):
                prompts.append({"file": rel, "line": i + 1, "text": "".join(lines[i - context_lines: i + 1])})
                break
        if len(prompts) == count:
            break
    return prompts


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as fh:
        fh.write(data)
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nimblelm train corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="corpus directory to write")
    parser.add_argument("--source", metavar="DIR", help=f"directory of .py files (default: this Python's stdlib)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--no-tests", action="store_true", help="leave out test/ and tests/ directories")
    args = parser.parse_args(argv)
    info = build_corpus(args.out, args.source, args.vocab_size, include_tests=not args.no_tests)
    for split, row in info["splits"].items():
        print(f"{split:>5}: {row['files']:5d} files {row['bytes'] / 1e6:7.2f} MB {row['tokens'] / 1e6:7.2f} M tokens")
    print(f"wrote {args.out} (vocab {info['vocab_size']})")
    return 0
