"""Golden tensors from flash-linear-attention's pure-torch references (issue 3), float64.

tests/ops/data/fla_based_golden.safetensors holds random float64 inputs and the outputs of
fla's reference functions on them (fla commit in the file's metadata, key "fla_commit").
It was produced by `scripts/make_fla_golden.py` (which loads fla's code at run time from a
checkout given on the command line; no fla code is in this repository):

    pip install einops
    python scripts/make_fla_golden.py /path/to/flash-linear-attention [--rev <commit>]

References used and the conventions that map them onto nimblelm:

* Based, `naive_parallel_based(q, k, v, use_norm)` (head-first [B, H, T, D]; default scale
  D^-1/2 on q; kernel 1 + u + u^2/2 with u = q.k / sqrt(D); o / (z + 1e-6)) ==
  `chunk_gla(taylor_second_order(q), taylor_second_order(k), v, scale=1.0,
  normalize=use_norm, eps=1e-6)` in [B, T, H, D]: our map's kernel is the same
  1 + q.k/sqrt(D) + (q.k)^2/(2D) (and fla's TaylorFeatureMap's). The `based` mixer runs
  exactly that with normalize=True; it is checked here through the layer with identity
  projections. (fla's own BasedLinearAttention in its default mode="parallel" calls
  parallel_based(..., scale=1), i.e. kernel 1 + q.k + (q.k)^2/2: that equals ours on
  q * sqrt(D); its chunk modes use TaylorFeatureMap, i.e. our convention.)
* GLA, `naive_recurrent_gla(q, k, v, gk, initial_state)` == `chunk_gla(q, k, v, gk=gk,
  initial_state=...)` (scale Dk^-1/2 both).
* DeltaNet, `delta_rule_recurrence` (head-first) and gated DeltaNet,
  `naive_recurrent_gated_delta_rule` == `chunk_delta_rule` / `naive_delta_rule` with g=None
  / g (L2-normalised q, k; scale Dk^-1/2 on q both).
* Sliding-window softmax attention (the other half of Based), `naive_parallel_attn(q, k,
  v, window_size=W)` (key s visible from t iff t - W < s <= t) == the `local_attention`
  mixer's masked SDPA with sliding_window=W (without its rotary embedding).

The recurrent references cast to float32 in fla; the script removes those casts so that
all golden outputs are float64. Measured against fla on larger random inputs (B=2,
T=64..256, H=2..4, feature dim 16, value dim 32): max abs error about 1e-13 (relative
~2e-15) in float64 and relative ~1e-6 in float32, i.e. rounding only.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import nimblelm as nl
from nimblelm.cache import ForwardInfo
from nimblelm.layers.attention import LocalAttention
from nimblelm.layers.linear_attention import BasedLinearAttention
from nimblelm.ops.delta import chunk_delta_rule, naive_delta_rule
from nimblelm.ops.feature_maps import taylor_second_order
from nimblelm.ops.gla import chunk_gla, naive_gla, step_gla

GOLDEN = Path(__file__).parent / "data" / "fla_based_golden.safetensors"
TOL = 1e-10


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float64, \
        (ours.shape, ref.shape, ours.dtype, ref.dtype)
    err = (ours - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max abs error {err:.3g}"


def test_golden_file_records_its_source():
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
    assert len(meta["fla_commit"]) == 40 and meta["generator"] == "scripts/make_fla_golden.py"


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("form", ["chunk", "chunk_padded", "naive", "step"])
def test_based_matches_naive_parallel_based(golden, norm, form):
    q, k, v = golden["based.q"], golden["based.k"], golden["based.v"]
    ref = golden[f"based.o_norm{int(norm)}"]
    pq, pk = taylor_second_order(q), taylor_second_order(k)
    kw = dict(scale=1.0, normalize=norm, eps=1e-6)
    if form == "chunk":
        o, _ = chunk_gla(pq, pk, v, chunk_size=16, **kw)
    elif form == "chunk_padded":  # T = 48 is not a multiple of 32: the last chunk is padded
        o, _ = chunk_gla(pq, pk, v, chunk_size=32, **kw)
    elif form == "naive":
        o, _ = naive_gla(pq, pk, v, **kw)
    else:
        state, outs = None, []
        for t in range(q.shape[1]):
            o_t, state = step_gla(pq[:, t:t + 1], pk[:, t:t + 1], v[:, t:t + 1], state=state, **kw)
            outs.append(o_t)
        o = torch.cat(outs, dim=1)
    assert_close(o, ref)


class _Slice(nn.Module):
    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x):
        return x[..., self.start:self.stop]


def test_based_mixer_matches_naive_parallel_based(golden):
    """The `based` layer with its projections replaced by slices of x = [q | k | v]."""
    q, k, v = golden["based.q"], golden["based.k"], golden["based.v"]
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    cfg = nl.ModelConfig(hidden_size=H * Dv, num_heads=H, chunk_size=16, extra={"feature_dim": D})
    layer = BasedLinearAttention(cfg, 0).to(torch.float64)
    layer.q_proj, layer.k_proj = _Slice(0, H * D), _Slice(H * D, 2 * H * D)
    layer.v_proj, layer.o_proj = _Slice(2 * H * D, 2 * H * D + H * Dv), nn.Identity()
    x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # [B, T, 2HD + HDv]
    ref = golden["based.o_norm1"].flatten(2)
    y, state = layer.sequence_forward(x, None)
    assert_close(y, ref)
    y1, state = layer.sequence_forward(x[:, :20], None)  # prefill, then decode the rest
    ys = [y1]
    for t in range(20, T):
        y_t, state = layer.step(x[:, t:t + 1], state)
        ys.append(y_t)
    assert_close(torch.cat(ys, dim=1), ref)


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_gla_matches_naive_recurrent_gla(golden, chunk_size):
    g = golden
    o, S = chunk_gla(g["q"], g["k"], g["v"], gk=g["gk"], initial_state=g["S0"],
                     output_final_state=True, chunk_size=chunk_size)
    assert_close(o, g["gla.o"])
    assert_close(S, g["gla.S"])


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("form", ["chunk", "naive"])
def test_delta_rule_matches_fla_recurrences(golden, gated, form):
    g = golden
    q, k = nn.functional.normalize(g["q"], dim=-1), nn.functional.normalize(g["k"], dim=-1)
    fn = naive_delta_rule if form == "naive" else chunk_delta_rule
    kw = {} if form == "naive" else {"chunk_size": 16}
    o, S = fn(q, k, g["v"], g["beta"], g=g["g"] if gated else None, initial_state=g["S0"],
              output_final_state=True, **kw)
    name = "gated_delta" if gated else "delta"
    assert_close(o, g[f"{name}.o"])
    assert_close(S, g[f"{name}.S"])


@pytest.mark.parametrize("window", [1, 7, 16])
def test_local_attention_window_matches_naive_parallel_attn(golden, window):
    q, k, v = golden["q"], golden["k"], golden["v"]  # [B, T, H, D]
    B, T, H, D = q.shape
    cfg = nl.ModelConfig(hidden_size=H * D, num_heads=H, num_kv_heads=H, sliding_window=window)
    layer = LocalAttention(cfg, 0)
    info = ForwardInfo(positions=torch.arange(T)[None].expand(B, T))
    o = layer._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), info)  # [B,H,T,D]
    assert_close(o.transpose(1, 2), golden[f"swa.o_w{window}"])
