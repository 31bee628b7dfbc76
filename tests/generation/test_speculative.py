"""The speculative engine end to end: greedy speculative == greedy autoregressive for every
preset and drafter quality; sampled speculative output has the target's distribution."""

import pytest
import torch

import nimblelm as nl
from nimblelm.generation.speculative.drafters import DraftModelDrafter, PromptLookupDrafter

from ..conftest import build, tiny_presets
from ..drafters_util import noisy_copy
from ..layers.test_recurrent_base import toy_model  # registers the toy recurrent mixer too


def models_under_test():
    for name in tiny_presets():
        yield name, lambda name=name: build(name)
    yield "toy-ssm-hybrid", toy_model


@pytest.mark.parametrize("name,make", list(models_under_test()), ids=lambda v: v if isinstance(v, str) else "")
def test_greedy_speculative_equals_autoregressive(name, make):
    target = make()
    prompt = torch.randint(0, target.config.vocab_size, (7,)).tolist()
    expected = nl.generate(target, prompt, max_new_tokens=24).tokens
    drafters = {"perfect": target, "random": build("attention-tiny", seed=99), "between": noisy_copy(target, 0.5)}
    for kind, draft in drafters.items():
        res = nl.generate(target, prompt, max_new_tokens=24, strategy="sps", drafter=DraftModelDrafter(draft, 4))
        assert torch.equal(res.tokens, expected), kind
        if kind == "perfect":
            assert res.stats.accepted_per_call == pytest.approx(24 / 5)  # 4 full rounds of 5 and one of 4
    res = nl.generate(target, prompt, max_new_tokens=24, strategy="lookup")
    assert torch.equal(res.tokens, expected)


def test_greedy_fp32_and_repetitive_text_for_lookup():
    target = build("attention-tiny", dtype=torch.float32)
    prompt = [5, 6, 7, 8, 9] * 4
    expected = nl.generate(target, prompt, max_new_tokens=40).tokens
    for strategy, drafter in [("lookup", PromptLookupDrafter(num_tokens=6)), ("sps", target)]:
        assert torch.equal(nl.generate(target, prompt, max_new_tokens=40, strategy=strategy, drafter=drafter).tokens,
                           expected)


def test_stop_token_and_max_new_tokens_inside_a_draft():
    target = build("attention-tiny")
    prompt = [1, 2, 3]
    free = nl.generate(target, prompt, max_new_tokens=20).tokens[0].tolist()
    stop = free[6]
    ar = nl.generate(target, prompt, max_new_tokens=20, stop_tokens=[stop])
    spec = nl.generate(target, prompt, max_new_tokens=20, stop_tokens=[stop], strategy="sps", drafter=target)
    assert spec.sequences() == ar.sequences()
    for n in (1, 3, 7):
        spec = nl.generate(target, prompt, max_new_tokens=n, strategy="sps", drafter=target)
        assert spec.tokens[0].tolist() == free[:n]


def test_errors_before_any_work():
    target = build("attention-tiny")
    other_vocab = nl.LanguageModel(nl.ModelConfig.from_preset("attention-tiny", vocab_size=300))
    with pytest.raises(nl.GenerationError, match="vocabulary \\(300\\) differs from the target's \\(256\\)"):
        nl.generate(target, [1, 2], strategy="sps", drafter=other_vocab)
    with pytest.raises(nl.GenerationError, match="one sequence at a time; got batch 2"):
        nl.generate(target, [[1, 2], [3, 4]], strategy="sps", drafter=target)
    with pytest.raises(nl.GenerationError, match="strategy 'sps' needs drafter="):
        nl.generate(target, [1, 2], strategy="sps")


def exact_two_token_distribution(model, prompt, sampling):
    from nimblelm.generation.sampling import probabilities

    V = model.config.vocab_size
    p1 = probabilities(model(torch.tensor([prompt])).logits[0, -1], sampling)
    joint = torch.zeros(V, V, dtype=torch.float64)
    for x1 in range(V):
        if p1[x1] > 0:
            p2 = probabilities(model(torch.tensor([prompt + [x1]])).logits[0, -1], sampling)
            joint[x1] = p1[x1] * p2
    return joint


def assert_round_is_exact(target, prompt, tree, cache, config):
    """Every branch of verifying ``tree`` (the cache holds ``prompt[:-1]``), then the
    target's own p when the round emitted one token: the joint of the first two tokens must
    equal autoregressive sampling's exactly."""
    from nimblelm.generation.sampling import probabilities
    from nimblelm.generation.speculative.verify import exact_outcomes, verify

    vocab = target.config.vocab_size
    logits = target(tree.tokens[None], tree.positions(cache.length)[None], cache=cache, tree=tree.to_spec()).logits[0]
    probs = probabilities(logits, config)
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    for prob, result in exact_outcomes(lambda rng: verify(tree, probs, rng)):
        tokens = result.tokens
        if len(tokens) >= 2:
            joint[tokens[0], tokens[1]] += prob
        else:
            after = probabilities(target(torch.tensor([prompt + tokens])).logits[0, -1], config)
            joint[tokens[0]] += prob * after
    torch.testing.assert_close(joint, exact_two_token_distribution(target, prompt, config), rtol=0, atol=1e-12)


def assert_first_two_tokens_follow_target(target, prompt, n, sampling_kwargs, **generate_kwargs):
    """Chi-square (~5 sigma) of the joint of the first two generated tokens over ``n`` seeds
    against the exact processed target distribution; a token the processed distribution
    removed must never appear."""
    from nimblelm.generation.sampling import SamplingConfig

    vocab = target.config.vocab_size
    joint = exact_two_token_distribution(target, prompt, SamplingConfig(**sampling_kwargs)).flatten()
    counts = torch.zeros_like(joint)
    for seed in range(n):
        toks = nl.generate(target, prompt, max_new_tokens=2, seed=seed, **sampling_kwargs,
                           **generate_kwargs).tokens[0]
        counts[toks[0] * vocab + toks[1]] += 1
    assert counts[joint == 0].sum() == 0
    expected = joint * n
    cells = expected > 0
    chi2 = (((counts - expected) ** 2)[cells] / expected[cells]).sum().item()
    dof = int(cells.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)


SAMPLING_CASES = [dict(temperature=0.7, top_k=3),
                  pytest.param(dict(temperature=1.0), marks=pytest.mark.slow),
                  pytest.param(dict(temperature=1.2, top_p=0.8), marks=pytest.mark.slow)]


@pytest.mark.parametrize("kwargs", SAMPLING_CASES)
def test_sampled_speculative_matches_target_distribution(kwargs):
    """Chi-square on the first two tokens vs the exact processed target distribution."""
    target = build("attention-tiny", vocab_size=5, seed=3)
    draft = build("attention-tiny", vocab_size=5, seed=4)
    assert_first_two_tokens_follow_target(target, [1, 2, 3], 600 if kwargs.get("top_k") else 1500, kwargs,
                                          strategy="sps", drafter=DraftModelDrafter(draft, 2))
