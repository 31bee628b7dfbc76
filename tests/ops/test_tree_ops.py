"""Tree forms (all nodes at once) against the level-by-level oracle built from step forms."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nimblelm as nl
from nimblelm.cache import ForwardInfo, TreeSpec
from nimblelm.layers.recurrent import RecurrentMixer
from nimblelm.ops.gla import step_gla
from nimblelm.ops.short_conv import step_causal_conv1d
from nimblelm.ops.tree import path_windows, tree_causal_conv1d, tree_gla_scalar


def _paths(parents):
    paths = []
    for i in range(len(parents)):
        path, node = [], i
        while node >= 0:
            path.append(node)
            node = parents[node]
        paths.append(path[::-1])
    return paths


parents_strategy = st.lists(st.integers(0, 10), min_size=1, max_size=9).map(
    lambda raw: [-1] + [r % (i + 1) for i, r in enumerate(raw[:-1])] if raw else [-1])


@settings(max_examples=25, deadline=None)
@given(parents=parents_strategy, kernel=st.integers(2, 5), seed=st.integers(0, 100))
def test_tree_conv_equals_stepping_each_path(parents, kernel, seed):
    gen = torch.Generator().manual_seed(seed)
    n, C = len(parents), 3
    x = torch.randn(2, n, C, generator=gen, dtype=torch.float64)
    weight, bias = torch.randn(C, kernel, generator=gen, dtype=torch.float64), torch.randn(C, generator=gen, dtype=torch.float64)
    state = torch.randn(2, C, kernel - 1, generator=gen, dtype=torch.float64)
    y, states = tree_causal_conv1d(x, weight, bias, "silu", state, parents)
    for i, path in enumerate(_paths(parents)):
        s = state
        for node in path:
            out, s = step_causal_conv1d(x[:, node:node + 1], weight, bias, "silu", s)
        torch.testing.assert_close(y[:, i], out[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(states[:, i], s, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(parents=parents_strategy, seed=st.integers(0, 100))
def test_tree_gla_equals_stepping_each_path(parents, seed):
    gen = torch.Generator().manual_seed(seed)
    n, H, Dk, Dv = len(parents), 2, 3, 4
    q, k = (torch.randn(1, n, H, Dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, n, H, Dv, generator=gen, dtype=torch.float64)
    g = -torch.rand(1, n, H, generator=gen, dtype=torch.float64) * 3
    state = torch.randn(1, H, Dk, Dv, generator=gen, dtype=torch.float64)
    spec = TreeSpec(torch.tensor(parents))
    o, states = tree_gla_scalar(q, k, v, g, spec.ancestor_mask, 0.5, state)
    for i, path in enumerate(_paths(parents)):
        s = state
        for node in path:
            sl = slice(node, node + 1)
            out, s = step_gla(q[:, sl], k[:, sl], v[:, sl], g=g[:, sl], scale=0.5, state=s)
        torch.testing.assert_close(o[:, i], out[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(states[:, i], s, rtol=0, atol=1e-12)


def test_path_windows_reach_into_the_state():
    # chain of 3 nodes, kernel 4: node 0 sees state columns 0..2 then itself (index 3)
    assert path_windows([-1, 0, 1], 4).tolist() == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert path_windows([-1, 0, 0], 3).tolist() == [[0, 1, 2], [1, 2, 3], [1, 2, 4]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mamba2_tree_pass_equals_level_by_level(dtype):
    torch.manual_seed(0)
    model = nl.LanguageModel(nl.ModelConfig.from_preset("mamba2-tiny")).to(dtype).eval()
    mixer = model.blocks[0].mixer
    parents = [-1, 0, 0, 1, 1, 2, 3, 5, 7]
    tree = TreeSpec(torch.tensor(parents))
    x = torch.randn(2, len(parents), model.config.hidden_size, dtype=dtype)
    positions = (tree.depth + 5).expand(2, -1)
    states = []
    for forward in (mixer._tree_forward, lambda *a: RecurrentMixer._tree_forward(mixer, *a)):
        state = mixer.init_state(2, 64, dtype=dtype)
        gen = torch.Generator().manual_seed(1)
        for t in state.tensors.values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=dtype))
        y = forward(x, tree, positions, state)
        states.append((y, state.pending))
    tol = dict(rtol=0, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states[0][0], states[1][0], **tol)
    for key in ("conv", "ssm"):
        for node in range(len(parents)):  # the one-pass ssm states are computed per node on demand
            torch.testing.assert_close(states[0][1][key][:, node], states[1][1][key][:, node], **tol)
