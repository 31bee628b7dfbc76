"""EAGLE drafting fast paths against their naive forms: incremental frontier-only head calls
(draft entries kept in the head's cache across depths) vs recomputing every ancestor at every
depth; the truncated draft vocabulary (FR-Spec) vs the full LM head, lossless greedy and
sampled decoding with it, and its file next to the drafter."""

import pytest
import torch

import nimblelm as nl
from nimblelm.cache import TreeSpec
from nimblelm.drafter_io import DRAFT_VOCAB, read_draft_vocab, save_draft_vocab
from nimblelm.generation.sampling import SamplingConfig
from nimblelm.generation.speculative.drafters import Eagle2Drafter, EagleDrafter, EagleHead, MedusaHeads
from nimblelm.generation.speculative.drafters.dynamic_tree import SubsetLogProbs, expand_tree, top_children
from nimblelm.generation.speculative.drafters.heads import (DraftLogProbs, expand_static, rank_tree, target_embed,
                                                            target_logits)

from ..conftest import build
from .test_speculative import assert_first_two_tokens_follow_target, assert_round_is_exact


def make_head(target, noise=0.3, seed=0):
    torch.manual_seed(seed)
    cfg = target.config
    head = EagleHead(cfg.hidden_size, cfg.vocab_size)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(noise * torch.randn_like(p))
    return head.to(target.embed.weight.dtype)


# -- incremental drafting vs recomputing every ancestor --------------------------------------------------
class Recorder:
    """Mixin: records every expand call (tree so far, frontier, returned log-probs)."""

    def begin(self, prompt, request):
        super().begin(prompt, request)
        self.records = []

    def _expand(self, tokens, parents, frontier):
        logp = self._expand_impl(tokens, parents, frontier)
        copy = SubsetLogProbs(logp.values.clone(), logp.token_ids, logp.vocab_size) \
            if isinstance(logp, SubsetLogProbs) else logp.clone()
        self.records.append((list(tokens), list(parents), list(frontier), copy))
        return logp

    def _expand_impl(self, tokens, parents, frontier):
        return super()._expand(tokens, parents, frontier)


class Recomputing(Recorder):
    """The drafting of the previous release: each depth runs the frontier AND all its
    ancestors as one tree call over the committed cache, then discards them."""

    def _expand_impl(self, tokens, parents, frontier):
        if frontier != [0]:
            needed = set()
            for node in frontier:
                while node > 0 and node not in needed:
                    needed.add(node)
                    node = parents[node]
            nodes = sorted(needed)
            index = {node: i for i, node in enumerate(nodes)}
            spec = TreeSpec(torch.tensor([index.get(parents[node], -1) for node in nodes]))
            positions = (self.cache.length + spec.depth)[None]
            embeds = target_embed(self.target, torch.tensor([tokens[node] for node in nodes]))
            feats = torch.stack([self.predicted[parents[node]] for node in nodes])
            out = self.head(embeds[None], feats[None], positions, cache=self.cache, tree=spec)[0]
            self.cache.commit([])
            self.calls += 1
            for node in frontier:
                self.predicted[node] = out[index[node]]
        return self.logprobs(torch.stack([self.predicted[node] for node in frontier]))


def drafters(cls, head, **kwargs):
    fast = type("Fast", (Recorder, cls), {})(head, **kwargs)
    naive = type("Naive", (Recomputing, cls), {})(head, **kwargs)
    return fast, naive


@pytest.mark.parametrize("cls, kwargs", [(EagleDrafter, dict(tree_size=12, max_depth=4, top_k=3)),
                                         (Eagle2Drafter, dict(depth=4, top_k=3, total_tokens=8))],
                         ids=["eagle", "eagle2"])
@pytest.mark.parametrize("vocab", [None, 60], ids=["full-vocab", "draft-vocab"])
def test_incremental_drafting_equals_recomputing_ancestors(cls, kwargs, vocab):
    """Same expand calls, same draft log-probs (to float64 rounding), same trees, same
    number of head calls, the same output; the head's cache ends at its committed length."""
    target = build("attention-tiny")
    head = make_head(target)
    if vocab is not None:
        head.set_draft_vocab(torch.randperm(target.config.vocab_size)[:vocab])
    prompt = [7, 3, 9, 2, 11]
    results = []
    for drafter in drafters(cls, head, **kwargs):
        res = nl.generate(target, prompt, max_new_tokens=14, strategy=cls.kind, drafter=drafter)
        results.append((res, drafter))
    (fast_res, fast), (naive_res, naive) = results
    assert torch.equal(fast_res.tokens, naive_res.tokens)
    assert fast.calls == naive.calls and fast_res.stats.rounds == naive_res.stats.rounds
    assert len(fast.records) == len(naive.records) > 4
    for (t1, p1, f1, lp1), (t2, p2, f2, lp2) in zip(fast.records, naive.records):
        assert (t1, p1, f1) == (t2, p2, f2)
        if vocab is not None:
            assert torch.equal(lp1.token_ids, lp2.token_ids)
            lp1, lp2 = lp1.values, lp2.values
        torch.testing.assert_close(lp1, lp2, rtol=1e-10, atol=1e-10)
    assert fast.cache.pending == 0 and fast.cache.length == naive.cache.length


def test_incremental_drafting_fp32_same_trees():
    """fp32: the draft log-probs agree to float32 rounding and every tree is the same."""
    target = build("attention-tiny", dtype=torch.float32)
    head = make_head(target, 0.2, seed=1)
    fast, naive = drafters(Eagle2Drafter, head, depth=5, top_k=4, total_tokens=12)
    expected = nl.generate(target, [5, 1, 8, 8, 2, 40], max_new_tokens=16).tokens
    for drafter in (fast, naive):
        assert torch.equal(nl.generate(target, [5, 1, 8, 8, 2, 40], max_new_tokens=16, strategy="eagle2",
                                       drafter=drafter).tokens, expected)
    assert [r[:3] for r in fast.records] == [r[:3] for r in naive.records]
    for a, b in zip(fast.records, naive.records):
        torch.testing.assert_close(a[3], b[3], rtol=1e-4, atol=1e-4)


# -- the draft vocabulary ----------------------------------------------------------------------------------
def test_draft_log_probs_are_the_softmax_over_the_subset_zero_elsewhere():
    target = build("attention-tiny")
    V = target.config.vocab_size
    ids = torch.tensor([3, 17, 0, 250, 99, 4])
    hidden = torch.randn(5, target.config.hidden_size, dtype=torch.float64)
    full, sub = DraftLogProbs(), DraftLogProbs()
    full.bind(target, None)
    sub.bind(target, ids.sort().values)
    torch.testing.assert_close(full(hidden), target_logits(target, hidden).log_softmax(-1), rtol=1e-12, atol=1e-12)
    subset = sub(hidden)
    assert isinstance(subset, SubsetLogProbs) and subset.token_ids.tolist() == sorted(ids.tolist())
    logp = subset.full()
    assert logp.shape == (5, V) and logp.dtype == torch.float64
    outside = torch.ones(V, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(logp[:, outside]).all()
    probs = logp.exp()  # what a sampled drafter would record in child_probs
    assert (probs[:, outside] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
    want = target_logits(target, hidden)[:, ids].log_softmax(-1)
    torch.testing.assert_close(logp[:, ids], want, rtol=1e-12, atol=1e-12)


def test_draft_vocab_with_logit_softcap():
    target = build("attention-tiny", logit_softcap=3.0)
    ids = torch.arange(0, 256, 5)
    lp = DraftLogProbs()
    lp.bind(target, ids)
    hidden = torch.randn(2, target.config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(lp(hidden).full()[:, ids], target_logits(target, hidden)[:, ids].log_softmax(-1),
                               rtol=1e-12, atol=1e-12)


def test_subset_log_probs_build_the_same_trees_as_their_full_form():
    """expand_tree / expand_static on a SubsetLogProbs == on its -inf-filled full form (and
    fewer children than top_k when the subset is smaller)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([2, 5, 11, 12, 30, 31, 47])

    def subset_expand(tokens, parents, frontier):
        values = torch.randn(len(frontier), len(ids), generator=gen, dtype=torch.float64).log_softmax(-1)
        return SubsetLogProbs(values, ids, 50)

    records = []

    def recording(tokens, parents, frontier):
        records.append(subset_expand(tokens, parents, frontier))
        return records[-1]

    a = expand_tree(1, recording, depth=4, top_k=3)
    replay = iter(records)
    b = expand_tree(1, lambda t, p, f: next(replay).full(), depth=4, top_k=3)
    assert a.tokens == b.tokens and a.parents == b.parents and torch.equal(a.scores, b.scores)
    assert set(a.tokens[1:]) <= set(ids.tolist())
    records.clear()
    shape = rank_tree(12, 3, 3)
    first = expand_static(1, shape, recording)
    replay = iter(records)
    second = expand_static(1, shape, lambda t, p, f: next(replay).full())
    assert first.token_list == second.token_list and torch.equal(first.parents, second.parents)
    small = SubsetLogProbs(torch.tensor([[-0.1, -2.4]], dtype=torch.float64), torch.tensor([4, 9]), 50)
    logp, tokens = top_children(small, 4, 1)
    assert tokens.tolist() == [[4, 9]] and logp.shape == (1, 2)
    with pytest.raises(nl.GenerationError, match="expand must return log-probabilities"):
        top_children(small, 2, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", ["eagle", "eagle2"])
def test_greedy_with_a_draft_vocab_equals_autoregressive(strategy, dtype):
    """Subsets that hold the target's choices, and one that holds none of them: every child
    comes from the subset and the output is autoregressive's."""
    target = build("attention-tiny", dtype=dtype)
    prompt = [4, 8, 15, 16, 23, 42]
    expected = nl.generate(target, prompt, max_new_tokens=16).tokens
    chosen = set(expected[0].tolist())
    others = torch.tensor([t for t in range(target.config.vocab_size) if t not in chosen])
    subsets = [torch.tensor(sorted(chosen | set(range(0, 256, 7)))), others[:20]]
    for ids in subsets:
        head = make_head(target, 0.1).set_draft_vocab(ids)
        drafter = (EagleDrafter if strategy == "eagle" else Eagle2Drafter)(head)
        trees = []
        original = drafter.propose
        drafter.propose = lambda context: trees.append(original(context)) or trees[-1]
        res = nl.generate(target, prompt, max_new_tokens=16, strategy=strategy, drafter=drafter)
        assert torch.equal(res.tokens, expected)
        allowed = set(ids.tolist())
        assert trees and all(set(t.token_list[1:]) <= allowed for t in trees)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.7, top_k=3), dict(temperature=1.0),
                                    dict(temperature=1.2, top_p=0.8)])
@torch.no_grad()
def test_one_round_with_a_draft_vocab_is_exact_by_enumeration(kwargs):
    """Every branch of verifying the EAGLE-2 drafter's real tree (drafted from a 3-token
    subset of a 5-token vocabulary), then the target's own p when the round emitted one
    token: the first two tokens' joint equals autoregressive sampling's."""
    vocab, prompt = 5, [1, 2, 3]
    config = SamplingConfig(**kwargs)
    target = build("attention-tiny", vocab_size=vocab, seed=3)

    class Request:
        max_new_tokens = 8

    Request.target = target
    drafter = Eagle2Drafter(make_head(target, 0.5).set_draft_vocab([0, 2, 4]), depth=3, top_k=2, total_tokens=6)
    drafter.begin(prompt, Request)
    cache = target.make_cache(1, 20)
    drafter.observe_features(target(torch.tensor([prompt[:-1]]), cache=cache).hidden[0])
    tree = drafter.propose(prompt)
    assert len(tree) > 3 and set(tree.token_list[1:]) <= {0, 2, 4}
    assert_round_is_exact(target, prompt, tree, cache, config)


def test_sampled_with_a_draft_vocab_matches_target_distribution():
    """Chi-square on the first two tokens, end to end through nl.generate."""
    target = build("attention-tiny", vocab_size=5, seed=3)
    drafter = Eagle2Drafter(make_head(target, 0.3).set_draft_vocab([1, 3, 4]), depth=3, top_k=3, total_tokens=6)
    assert_first_two_tokens_follow_target(target, [1, 2, 3], 300, dict(temperature=0.9, top_k=4),
                                          strategy="eagle2", drafter=drafter)


def test_draft_vocab_errors_and_opt_out():
    head = EagleHead(64, 300)
    for bad in ([], [[1, 2]], [0.5, 1.5], [-1, 3], [3, 300], [4, 4, 5]):
        with pytest.raises(nl.GenerationError, match="draft vocabulary"):
            head.set_draft_vocab(bad)
    assert head.set_draft_vocab([9, 2, 5]).draft_vocab.tolist() == [2, 5, 9]
    target = build("attention-tiny")
    expected = nl.generate(target, [1, 2, 3], max_new_tokens=6).tokens
    # a subset smaller than top_k: fewer children per node
    head = make_head(target).set_draft_vocab([1, 2, 3])
    for strategy in ("eagle", "eagle2"):
        assert torch.equal(nl.generate(target, [1, 2, 3], max_new_tokens=6, strategy=strategy, drafter=head).tokens,
                           expected)
    # draft_vocab=False: the whole vocabulary, whatever the head carries
    head = make_head(target).set_draft_vocab([1, 2, 3])
    drafter = Eagle2Drafter(head, draft_vocab=False)
    res = nl.generate(target, [1, 2, 3], max_new_tokens=6, strategy="eagle2", drafter=drafter)
    assert torch.equal(res.tokens, expected)
    assert drafter.logprobs.vocab_ids is None


# -- the file next to the drafter --------------------------------------------------------------------------
def test_frequent_tokens_and_write_draft_vocab(tmp_path):
    from nimblelm.training.data import write_token_stream
    from nimblelm.training.train_drafter import frequent_tokens, write_draft_vocab

    stream = [5, 5, 5, 2, 2, 9, 9, 1, 7, 7, 7, 7]
    assert frequent_tokens(stream, 10, 2).tolist() == [5, 7]  # counts: 7 x4, 5 x3, 2 x2, 9 x2, 1 x1
    assert frequent_tokens(stream, 10, 3).tolist() == [2, 5, 7]  # the tie 2 / 9 goes to the smaller id
    assert frequent_tokens(stream, 10, 5).tolist() == [1, 2, 5, 7, 9]
    with pytest.raises(nl.NimbleError, match="size must be in 1..10"):
        frequent_tokens(stream, 10, 11)
    with pytest.raises(nl.NimbleError, match="ids >= 8"):
        frequent_tokens(stream, 8, 2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_token_stream(str(corpus / "train.bin"), stream * 3)
    path = write_draft_vocab(str(corpus), str(tmp_path / "eagle"), 2, 10)
    assert path.endswith(DRAFT_VOCAB) and read_draft_vocab(str(tmp_path / "eagle")).tolist() == [5, 7]


def test_draft_vocab_file_round_trip(tmp_path):
    from nimblelm.drafter_io import save_drafter

    target = build("attention-tiny", dtype=torch.float32)
    head = make_head(target, 0.1).set_draft_vocab([8, 1, 30, 7])
    save_drafter(head, str(tmp_path / "eagle"))
    assert (tmp_path / "eagle" / DRAFT_VOCAB).is_file()
    loaded = nl.load_drafter(str(tmp_path / "eagle"), "eagle")
    assert loaded.draft_vocab.tolist() == [1, 7, 8, 30]
    assert read_draft_vocab(str(tmp_path)) is None
    save_drafter(head.set_draft_vocab(None), str(tmp_path / "eagle"))  # no stale file left behind
    assert not (tmp_path / "eagle" / DRAFT_VOCAB).exists()
    assert nl.load_drafter(str(tmp_path / "eagle"), "eagle").draft_vocab is None
    save_draft_vocab([1, 400], str(tmp_path / "eagle"))
    with pytest.raises(nl.CheckpointError, match="draft_vocab.safetensors: a draft vocabulary needs distinct token"):
        nl.load_drafter(str(tmp_path / "eagle"), "eagle")
    save_drafter(MedusaHeads(target.config.hidden_size, target.config.vocab_size), str(tmp_path / "medusa"))
    save_draft_vocab([1, 2], str(tmp_path / "medusa"))
    with pytest.raises(nl.CheckpointError, match="medusa heads do not support a draft vocabulary"):
        nl.load_drafter(str(tmp_path / "medusa"), "medusa")
    from safetensors.torch import save_file

    save_file({"ids": torch.zeros(3)}, str(tmp_path / "eagle" / DRAFT_VOCAB))
    with pytest.raises(nl.CheckpointError, match="one 1-D integer tensor 'token_ids'"):
        nl.load_drafter(str(tmp_path / "eagle"), "eagle")


@pytest.mark.parametrize("name", ["nimble-code-attn", "nimble-code-hybrid"])
def test_shipped_eagle_drafters_carry_a_draft_vocab(name):
    head = nl.load_drafter(name, "eagle")
    ids = head.draft_vocab
    assert ids is not None and ids.numel() == 2048
    assert torch.equal(ids, ids.unique()) and 0 <= int(ids[0]) and int(ids[-1]) < head.vocab_size


def test_train_drafter_vocab_only_writes_the_file(tmp_path):
    from nimblelm.training.data import write_token_stream
    from nimblelm.training.train_drafter import main

    target = build("attention-tiny", dtype=torch.float32)
    target.save(str(tmp_path / "target"))
    (tmp_path / "corpus").mkdir()
    write_token_stream(str(tmp_path / "corpus" / "train.bin"), [3] * 5 + [9] * 4 + [1] * 2 + list(range(200)))
    args = ["--target", str(tmp_path / "target"), "--kind", "eagle", "--data", str(tmp_path / "corpus"),
            "--out", str(tmp_path / "eagle")]
    assert main(args + ["--draft-vocab", "3", "--vocab-only"]) == 0
    assert read_draft_vocab(str(tmp_path / "eagle")).tolist() == [1, 3, 9]
    with pytest.raises(nl.NimbleError, match="--vocab-only needs --draft-vocab N"):
        main(args + ["--vocab-only"])
    with pytest.raises(nl.NimbleError, match="apply to --kind eagle only"):
        main(args[:3] + ["medusa"] + args[4:] + ["--draft-vocab", "3"])
