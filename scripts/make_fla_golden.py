"""Write tests/ops/data/fla_based_golden.safetensors: float64 inputs and the outputs of
flash-linear-attention's pure-torch reference functions, for tests/ops/test_fla_golden.py.

No fla code lives here or in the repository: the references are loaded at run time from a
copy of flash-linear-attention (https://github.com/fla-org/flash-linear-attention, MIT):

    pip install einops   # the fla naive modules import it (or put it on PYTHONPATH)
    python scripts/make_fla_golden.py /path/to/flash-linear-attention        # a checkout
    python scripts/make_fla_golden.py /path/to/repo.git --rev <commit>       # or a bare git dir

Used from fla (file: function):

    fla/ops/based/naive.py             naive_parallel_based (use_norm True and False)
    fla/ops/gla/naive.py               naive_recurrent_gla
    fla/ops/delta_rule/naive.py        delta_rule_recurrence
    fla/ops/gated_delta_rule/naive.py  naive_recurrent_gated_delta_rule
    fla/ops/attn/naive.py              naive_parallel_attn (window_size)

The three recurrent references cast their inputs to float32 (`.float()`, `.to(torch.float32)`,
a float32 state); this script removes exactly those casts from the source text before
running it (see PATCHES) so that the references run in float64. Nothing else is changed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "ops" / "data" / "fla_based_golden.safetensors"

FILES = {
    "based": "fla/ops/based/naive.py",
    "gla": "fla/ops/gla/naive.py",
    "delta_rule": "fla/ops/delta_rule/naive.py",
    "gated_delta_rule": "fla/ops/gated_delta_rule/naive.py",
    "attn": "fla/ops/attn/naive.py",
}

# (old, new) text replacements removing the float32 casts; each must occur in the file
PATCHES = {
    "gla": [("x.transpose(1, 2).float()", "x.transpose(1, 2)"),
            (", dtype=torch.float32)", ")"),
            ("initial_state.float()", "initial_state")],
    "delta_rule": [("map(lambda x: x.float(), [q, k, v, beta])", "(q, k, v, beta)")],
    "gated_delta_rule": [("x.transpose(1, 2).contiguous().to(torch.float32)",
                          "x.transpose(1, 2).contiguous()"),
                         ("h = initial_state.to(torch.float32)", "h = initial_state.clone()")],
}


def read_source(root: Path, rev: str, path: str) -> str:
    if (root / path).is_file():
        return (root / path).read_text()
    return subprocess.run(["git", f"--git-dir={root}", "show", f"{rev}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def fla_commit(root: Path, rev: str) -> str:
    git_dir = ["-C", str(root)] if (root / "fla").is_dir() else [f"--git-dir={root}"]
    out = subprocess.run(["git", *git_dir, "rev-parse", rev], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def load_module(name: str, source: str) -> types.ModuleType:
    for old, new in PATCHES.get(name, []):
        if old not in source:
            raise SystemExit(f"{FILES[name]}: expected text {old!r} not found (fla changed?)")
        source = source.replace(old, new)
    module = types.ModuleType(f"fla_naive_{name}")
    exec(compile(source, FILES[name], "exec"), module.__dict__)
    return module


def hf(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] <-> [B, H, T, D] (the based and delta_rule references are head-first)."""
    return x.transpose(1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fla", type=Path, help="flash-linear-attention checkout or bare git dir")
    parser.add_argument("--rev", default="HEAD", help="commit to read from a git dir (default HEAD)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    ref = {name: load_module(name, read_source(args.fla, args.rev, path)) for name, path in FILES.items()}
    f64 = torch.float64
    gen = torch.Generator().manual_seed(20240603)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    t = {}
    # Based: feature dim 16, default scale 16^-1/2 on q, kernel 1 + u + u^2/2 with u = q.k/4
    B, T, H, D, Dv = 1, 48, 2, 16, 8
    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, Dv)
    t.update({"based.q": q, "based.k": k, "based.v": v})
    for norm in (True, False):
        o = ref["based"].naive_parallel_based(hf(q), hf(k), hf(v), use_norm=norm)
        t[f"based.o_norm{int(norm)}"] = hf(o)

    # GLA / DeltaNet / gated DeltaNet / sliding-window attention share shapes
    B, T, H, Dk, Dv = 1, 40, 2, 8, 8
    q, k, v = randn(B, T, H, Dk), randn(B, T, H, Dk), randn(B, T, H, Dv)
    gk = F.logsigmoid(randn(B, T, H, Dk) * 2 + 2)
    S0 = randn(B, H, Dk, Dv) * 0.5
    t.update({"q": q, "k": k, "v": v, "gk": gk, "S0": S0})
    o, S = ref["gla"].naive_recurrent_gla(q, k, v, gk, initial_state=S0, output_final_state=True)
    t.update({"gla.o": o, "gla.S": S})

    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # the delta rule expects unit q, k
    beta = torch.rand(B, T, H, generator=gen, dtype=f64)
    g = F.logsigmoid(randn(B, T, H) * 2 + 3)
    t.update({"beta": beta, "g": g})
    o, S = ref["delta_rule"].delta_rule_recurrence(hf(qn), hf(kn), hf(v), hf(beta), initial_state=S0.clone())
    t.update({"delta.o": hf(o), "delta.S": S})
    o, S = ref["gated_delta_rule"].naive_recurrent_gated_delta_rule(
        qn, kn, v, beta, g, initial_state=S0, output_final_state=True)
    t.update({"gated_delta.o": o, "gated_delta.S": S})

    for window in (1, 7, 16):
        o, _ = ref["attn"].naive_parallel_attn(q, k, v, window_size=window)
        t[f"swa.o_w{window}"] = o

    t = {name: x.contiguous() for name, x in t.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(args.out), metadata={"fla_commit": fla_commit(args.fla, args.rev),
                                           "generator": "scripts/make_fla_golden.py"})
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(t)} tensors)", file=sys.stderr)


if __name__ == "__main__":
    main()
