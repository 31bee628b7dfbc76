"""nl.generate / nl.stream with strategy="autoregressive"."""

import pytest
import torch

import nimblelm as nl
from nimblelm.generation.sampling import SamplingConfig, probabilities, top_k_filter, top_p_filter

from ..conftest import build


def argmax_loop(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("preset", ["attention-tiny", "moe-tiny", "local-attention-tiny"])
def test_greedy_equals_argmax_loop(preset):
    model = build(preset)
    prompt = torch.randint(0, 256, (6,)).tolist()
    result = nl.generate(model, prompt, max_new_tokens=12)
    assert result.tokens[0].tolist() == argmax_loop(model, prompt, 12)
    assert result.stats.target_calls == 12 and result.stats.accepted_per_call == 1.0
    assert result.stats.tokens_per_s > 0


def test_greedy_fp32_equals_argmax_loop():
    model = build("attention-tiny", dtype=torch.float32)
    prompt = torch.randint(0, 256, (9,)).tolist()
    assert nl.generate(model, prompt, max_new_tokens=16).tokens[0].tolist() == argmax_loop(model, prompt, 16)


@pytest.mark.parametrize("preset", ["attention-tiny", "local-attention-tiny"])
def test_batched_ragged_prompts_equal_one_by_one(preset):
    model = build(preset)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (3, 10, 6)]
    batched = nl.generate(model, prompts, max_new_tokens=10)
    for b, prompt in enumerate(prompts):
        alone = nl.generate(model, prompt, max_new_tokens=10)
        assert batched.tokens[b].tolist() == alone.tokens[0].tolist()


def test_sampling_with_seed_is_reproducible_and_seeds_differ():
    model = build("attention-tiny", dtype=torch.float32)
    kwargs = dict(max_new_tokens=20, temperature=1.5)
    a = nl.generate(model, [5, 6, 7], seed=3, **kwargs).tokens
    b = nl.generate(model, [5, 6, 7], seed=3, **kwargs).tokens
    c = nl.generate(model, [5, 6, 7], seed=4, **kwargs).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampled_tokens_respect_top_k():
    model = build("attention-tiny")
    prompt = [1, 2, 3]
    res = nl.generate(model, prompt, max_new_tokens=1, temperature=1.0, top_k=3, seed=0)
    allowed = model(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist()
    for seed in range(20):
        res = nl.generate(model, prompt, max_new_tokens=1, temperature=1.0, top_k=3, seed=seed)
        assert res.tokens[0, 0].item() in allowed


def test_stop_tokens_end_rows_and_pad():
    model = build("attention-tiny")
    prompts = [[1, 2, 3], [9, 8]]
    free = nl.generate(model, prompts, max_new_tokens=8)
    stop = free.tokens[0, 2].item()
    res = nl.generate(model, prompts, max_new_tokens=8, stop_tokens=[stop], pad_token_id=-1)
    first = res.sequences()[0]
    assert first[-1] == stop and stop not in first[:-1] and len(first) <= 3
    assert res.tokens[0, len(first):].eq(-1).all()


def test_stream_yields_the_generated_tokens():
    model = build("attention-tiny")
    events = list(nl.stream(model, [4, 5, 6], max_new_tokens=7))
    streamed = [t for ev in events for t in ev.tokens[0]]
    assert streamed == nl.generate(model, [4, 5, 6], max_new_tokens=7).tokens[0].tolist()
    assert not any(f for ev in events for f in ev.from_draft[0])


def test_tensor_prompt_with_token_mask():
    model = build("attention-tiny")
    tokens = torch.tensor([[0, 0, 7, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[False, False, True, True], [True] * 4])
    res = nl.generate(model, tokens, max_new_tokens=5, token_mask=mask)
    assert res.tokens[0].tolist() == nl.generate(model, [7, 8], max_new_tokens=5).tokens[0].tolist()
    assert res.tokens[1].tolist() == nl.generate(model, [1, 2, 3, 4], max_new_tokens=5).tokens[0].tolist()


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_ids=[1, 256]), "token id 256 is out of range for a vocabulary of 256"),
    (dict(prompt_ids=[-3]), "token id -3 is out of range"),
    (dict(prompt_ids=[1] * 600), "longer than the model's context of 512"),
    (dict(prompt_ids=[1] * 500, max_new_tokens=20), "use max_new_tokens <= 12"),
    (dict(prompt_ids=[1], max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
    (dict(prompt_ids=[1], strategy="bogus"), "unknown strategy 'bogus'"),
    (dict(prompt_ids=[1], temperature=-1.0), "temperature must be >= 0"),
    (dict(prompt_ids=[1], top_p=1.5, temperature=1.0), "top_p must be in"),
    (dict(prompt_ids=[[1, 2], []]), "at least one token"),
])
def test_bad_arguments_raise_before_any_work(kwargs, message):
    model = build("attention-tiny")
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(nl.GenerationError, match=message):
        nl.generate(model, **kwargs)


def test_zero_new_tokens():
    res = nl.generate(build("attention-tiny"), [[1, 2], [3]], max_new_tokens=0)
    assert res.tokens.shape == (2, 0) and res.lengths == [0, 0]


def test_top_k_and_top_p_are_pure_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, True, True, True, False]]
    probs = logits.softmax(-1)[0]  # sorted: 3.0 (.60), 2.0 (.22), 1.0 (.08) ...
    kept = ~torch.isinf(top_p_filter(logits, 0.7))[0]
    assert kept.tolist() == [True, False, False, False, True]  # .60 < .7, .60 + .22 >= .7
    assert (~torch.isinf(top_p_filter(logits, float(probs[4]) - 1e-6))).sum() == 1  # top token always kept
    p = probabilities(logits, SamplingConfig(temperature=0.5, top_k=3))
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    assert (p[0, [3]] == 0).all() and (p[0, 2] == 0)
    assert probabilities(logits, SamplingConfig()).tolist() == [[0, 0, 0, 0, 1.0]]
