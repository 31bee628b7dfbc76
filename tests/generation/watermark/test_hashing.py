"""g-values: pure integer hashing, identical for any batching/dtype, fair and uncorrelated."""

from __future__ import annotations

import random

import pytest

import torch

from nimblelm.generation.watermark.hashing import g_value_reference, g_values, layer_seeds


def test_tensor_hash_equals_python_int_oracle():
    rng = random.Random(0)
    keys = [rng.randrange(-2**63, 2**64) for _ in range(6)] + [0, 1, 2**40 + 7]
    seeds = layer_seeds(keys)
    contexts = torch.tensor([[rng.randrange(0, 2**31) for _ in range(4)] for _ in range(7)])
    candidates = torch.tensor([0, 1, 5, 255, 50_000, 2**31 - 1])
    g = g_values(seeds, contexts, candidates)  # [7, m, 6]
    assert g.shape == (7, len(keys), 6)
    for r in range(7):
        for layer, key in enumerate(keys):
            for c, cand in enumerate(candidates.tolist()):
                assert g[r, layer, c] == g_value_reference(key, layer, contexts[r].tolist(), cand)


def test_identical_for_any_batching_order_and_dtype():
    seeds = layer_seeds(list(range(30)))
    contexts = torch.randint(0, 1000, (16, 4))
    vocab = torch.arange(300)
    full = g_values(seeds, contexts, vocab)
    rows = {i: g_values(seeds, contexts[i:i + 1], vocab) for i in reversed(range(16))}  # reverse call order
    one_by_one = torch.cat([rows[i] for i in range(16)])
    assert torch.equal(full, one_by_one)
    assert torch.equal(full, g_values(seeds, contexts.int(), vocab.int()))
    per_row = g_values(seeds, contexts, vocab.expand(16, 300))  # per-row candidates
    assert torch.equal(full, per_row)
    assert torch.equal(full[3:5, :, 7], g_values(seeds, contexts[3:5], torch.tensor([[7], [7]]))[..., 0])


def test_mean_half_and_no_correlation_across_layers_contexts_candidates():
    seeds = layer_seeds([11 * k + 3 for k in range(30)])
    gen = torch.Generator().manual_seed(0)
    contexts = torch.randint(0, 32000, (4000, 4), generator=gen)
    g = g_values(seeds, contexts, torch.arange(25)).double()  # 4000 x 25 = 1e5 n-grams, 30 layers
    assert abs(float(g.mean()) - 0.5) < 0.01
    assert float((g.mean((0, 2)) - 0.5).abs().max()) < 0.01  # every layer fair
    layers = g.permute(1, 0, 2).reshape(30, -1)  # [m, 1e5]
    corr = torch.corrcoef(layers)
    off = corr[~torch.eye(30, dtype=torch.bool)]
    assert float(off.abs().max()) < 0.02  # 435 pairs, std 1/sqrt(1e5) = 0.003
    # neighbouring candidates and contexts that differ in one token are uncorrelated too
    cand = torch.corrcoef(torch.stack([g[:, :, c].reshape(-1) for c in range(25)]))
    assert float(cand[~torch.eye(25, dtype=torch.bool)].abs().max()) < 0.03
    shifted = contexts.clone()
    shifted[:, -1] += 1
    g2 = g_values(seeds, shifted, torch.arange(25)).double()
    assert abs(float(torch.corrcoef(torch.stack([g.reshape(-1), g2.reshape(-1)]))[0, 1])) < 0.01


def test_keys_change_everything_and_layer_index_matters():
    contexts = torch.randint(0, 100, (200, 4))
    a = g_values(layer_seeds([5, 6]), contexts, torch.arange(50))
    b = g_values(layer_seeds([5, 7]), contexts, torch.arange(50))
    assert torch.equal(a[:, 0], b[:, 0]) and 0.4 < float((a[:, 1] != b[:, 1]).double().mean()) < 0.6
    same_key = g_values(layer_seeds([5, 5]), contexts, torch.arange(50))
    assert 0.4 < float((same_key[:, 0] != same_key[:, 1]).double().mean()) < 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_identical_on_cuda():
    seeds = layer_seeds([2**63 + 5, -7, 123])
    contexts = torch.randint(0, 2**31, (64, 4))
    vocab = torch.arange(5000)
    assert torch.equal(g_values(seeds, contexts, vocab), g_values(seeds, contexts.cuda(), vocab.cuda()).cpu())


def test_context_cache_equals_tensor_hashes():
    from nimblelm.generation.watermark.hashing import ContextHashCache, context_hashes

    seeds = layer_seeds([9, 8, 7, 2**50])
    cache = ContextHashCache(seeds, max_entries=10)
    for trial in range(3):  # hits, misses and a cache that starts over
        contexts = torch.randint(0, 2**31, (8 if trial else 2, 4), generator=torch.Generator().manual_seed(trial % 2))
        assert torch.equal(cache(contexts), context_hashes(seeds, contexts))
