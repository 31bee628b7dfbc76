"""RecurrentMixer machinery (padding, draft trees, commit) on a toy diagonal SSM with a
short convolution, inside a hybrid with attention."""

import pytest
import torch
from torch import nn

import nimblelm as nl
from nimblelm.cache import TreeSpec
from nimblelm.layers.recurrent import RecurrentMixer
from nimblelm.layers.registry import register_mixer

from ..models.test_lm import path_to, random_tree

KERNEL = 3


@register_mixer("toy_ssm")
class ToyDiagonalSSM(RecurrentMixer):
    """u = causal conv(x) (window KERNEL); h_t = a * h_{t-1} + tanh(u_t); y = out(h)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        size = config.hidden_size
        self.conv = nn.Parameter(torch.randn(size, KERNEL) * 0.5)
        self.decay = nn.Parameter(torch.rand(size) * 0.9)
        self.out = nn.Linear(size, size, bias=False)

    def state_shapes(self, batch):
        size = self.decay.numel()
        return {"h": (batch, size), "window": (batch, KERNEL - 1, size)}

    def step(self, x, state, positions=None):
        window = torch.cat([state["window"], x], 1)  # [N, KERNEL, C]
        u = (window * self.conv.t()).sum(1)
        h = self.decay * state["h"] + torch.tanh(u)
        return self.out(h)[:, None], {"h": h, "window": window[:, 1:]}

    def sequence_forward(self, x, state, positions=None):
        if state is None:
            state = {k: x.new_zeros(s) for k, s in self.state_shapes(x.shape[0]).items()}
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t:t + 1], state)
            ys.append(y)
        return torch.cat(ys, 1), state


def toy_model():
    torch.manual_seed(0)
    cfg = nl.ModelConfig(num_layers=3, mixer_pattern=["toy_ssm", "attention", "toy_ssm"], hidden_size=32)
    return nl.LanguageModel(cfg).double().eval()


def test_decode_equals_full_forward():
    model = toy_model()
    tokens = torch.randint(0, 256, (2, 15))
    cache = model.make_cache(2, 15)
    parts = [model(tokens[:, :4], cache=cache).logits] + [model(tokens[:, t:t + 1], cache=cache).logits for t in range(4, 15)]
    torch.testing.assert_close(torch.cat(parts, 1), model(tokens).logits, rtol=1e-10, atol=1e-10)


def test_tree_logits_equal_paths_and_commit_equals_fresh_prefill():
    model = toy_model()
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 256, (1, 6), generator=gen)
    tree = random_tree(9, gen)
    nodes = torch.randint(0, 256, (1, 9), generator=gen)
    cache = model.make_cache(1, 30)
    model(prefix, cache=cache)
    tree_logits = model(nodes, (6 + tree.depth)[None], cache=cache, tree=tree).logits
    for node in range(9):
        alone = model(torch.cat([prefix, nodes[:, path_to(tree, node)]], 1)).logits[:, -1]
        torch.testing.assert_close(tree_logits[:, node], alone, rtol=1e-10, atol=1e-10)
    path = path_to(tree, int(tree.depth.argmax()))
    cache.commit(path)
    fresh = model.make_cache(1, 30)
    model(torch.cat([prefix, nodes[:, path]], 1), cache=fresh)
    for mine, ref in zip(cache.states, fresh.states):
        if hasattr(mine, "tensors"):
            for name in ref.tensors:
                torch.testing.assert_close(mine.tensors[name], ref.tensors[name], rtol=1e-12, atol=1e-12)
    nxt = torch.randint(0, 256, (1, 2), generator=gen)
    torch.testing.assert_close(model(nxt, cache=cache).logits, model(nxt, cache=fresh).logits)


def test_chain_with_nothing_kept_leaves_state_unchanged():
    model = toy_model()
    cache = model.make_cache(1, 20)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    before = [dict(s.tensors) for s in cache.states if hasattr(s, "tensors")]
    model(torch.tensor([[4, 5]]), cache=cache, tree=TreeSpec.chain(2))
    cache.commit([])
    after = [s.tensors for s in cache.states if hasattr(s, "tensors")]
    for b, a in zip(before, after):
        for name in b:
            assert torch.equal(b[name], a[name])
    assert cache.length == 3


def test_left_padded_generation_equals_alone():
    model = toy_model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    batched = nl.generate(model, prompts, max_new_tokens=6)
    for b, prompt in enumerate(prompts):
        assert batched.tokens[b].tolist() == nl.generate(model, prompt, max_new_tokens=6).tokens[0].tolist()
