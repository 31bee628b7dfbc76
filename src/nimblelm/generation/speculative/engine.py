"""The speculative decoding loop shared by every drafter: one target call per round.

Round: the drafter proposes a :class:`DraftTree` whose root is the last emitted token (not
yet in the target's cache); the target scores every node in one call (tree mask +
per-node positions; recurrent mixers compute one state per node); :func:`verify` picks the
accepted path and the bonus token from the target's processed distribution; the cache keeps
the accepted path (``cache.commit``); the drafter is told what was emitted. Greedy output
equals autoregressive output token for token; sampled output has exactly the target's
distribution.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from ...errors import GenerationError
from ..generate import GenerationRequest, GenerationStats, StreamEvent
from ..sampling import probabilities
from ..watermark.speculative import speculative_watermark
from .verify import truncate_at_stop, verify, verify_greedy, verify_greedy_on_demand


def check_target_supports_trees(target, strategy: str) -> None:
    """Refuse (before any work) targets whose layers cannot verify a draft tree."""
    blocks = getattr(target, "blocks", None)
    if blocks is None:
        if not getattr(target, "supports_tree", False):  # tree_refusal: the target's own why + alternatives
            why = getattr(target, "tree_refusal", None) or f"{type(target).__name__} does not"
            raise GenerationError(f"strategy {strategy!r} needs a target that verifies draft trees; {why} "
                                  "(or use strategy='autoregressive')")
        return
    unsupported = sorted({type(b.mixer).__name__ for b in blocks if not getattr(b.mixer, "supports_tree", False)})
    if unsupported:
        raise GenerationError(f"strategy {strategy!r} needs tree verification, which {', '.join(unsupported)} "
                              "layers do not support; use strategy='autoregressive'")


def speculative_rounds(request: GenerationRequest, drafter, strategy: str) -> Iterator[StreamEvent]:
    """Run rounds until max_new_tokens or a stop token; batch size 1."""
    if request.batch != 1:
        raise GenerationError(f"strategy {strategy!r} decodes one sequence at a time; got batch {request.batch} "
                              "(call generate per prompt, or use strategy='autoregressive' for batches)")
    prompt = request.tokens[0][request.token_mask[0]].tolist()
    watermark = speculative_watermark(request, prompt)  # None without one; checked before any work
    target = request.target
    check_target_supports_trees(target, strategy)
    vocab = target.config.vocab_size
    draft_vocab = getattr(drafter, "vocab_size", None)
    if draft_vocab is not None and draft_vocab != vocab:
        raise GenerationError(f"the drafter's vocabulary ({draft_vocab}) differs from the target's ({vocab}); "
                              "draft and target must share a tokenizer")
    if request.max_new_tokens == 0:
        return
    max_nodes = drafter.max_tree_size
    cache = target.make_cache(1, len(prompt) + request.max_new_tokens + max_nodes)
    drafter.begin(prompt, request)
    observe = getattr(drafter, "observe_features", None)  # feature drafters (Medusa, Hydra, EAGLE): hidden [n, D]
    stats, start = GenerationStats(), time.perf_counter()
    if len(prompt) > 1:
        out = target(torch.tensor([prompt[:-1]]), cache=cache, logits_to_keep=1)  # prefill logits are unused
        stats.target_calls += 1
        if observe is not None:
            observe(out.hidden[0])
    stats.prefill_s = time.perf_counter() - start
    context, emitted = list(prompt), 0
    while emitted < request.max_new_tokens:
        proposing = time.perf_counter()
        tree = drafter.propose(context)
        stats.draft_s += time.perf_counter() - proposing
        out, result = verify_round(target, tree, cache, request, watermark)
        stats.target_calls += 1
        stats.rounds += 1
        emission = truncate_at_stop(result, tree, request.stop_tokens, request.max_new_tokens - emitted)
        cache.commit(emission.commit)
        if observe is not None:
            observe(out.hidden[0, emission.commit])
        context.extend(emission.tokens)
        emitted += len(emission.tokens)
        if watermark is not None:
            watermark.sync(context)  # accepted tokens only: rejected drafts leave no trace
        drafter.accept(context, emission)
        stats.new_tokens = emitted
        stats.draft_calls = drafter.calls
        stats.total_s = time.perf_counter() - start
        yield StreamEvent(tokens=[emission.tokens], from_draft=[emission.from_draft], stats=stats)
        if emission.stopped:
            return


def verify_round(target, tree, cache, request: GenerationRequest, watermark):
    """One target call on the draft tree (left pending in ``cache``) and its verification ->
    (the target's output, VerifyResult)."""
    tokens, positions, spec = tree.tokens[None], tree.positions(cache.length)[None], tree.to_spec()
    if watermark is None and request.sampling.greedy:
        if getattr(target, "computes_logits_on_demand", False):  # the LM head runs only where the walk goes
            out = target(tokens, positions, cache=cache, tree=spec, compute_logits=False)
            hidden = out.hidden[0]
            return out, verify_greedy_on_demand(
                tree, lambda nodes: target.head_logits(hidden[nodes]).argmax(-1).tolist(), target.config.vocab_size)
        out = target(tokens, positions, cache=cache, tree=spec)
        # greedy needs only the argmax: skip building the one-hot [n, V] distribution
        return out, verify_greedy(tree, out.logits[0])
    out = target(tokens, positions, cache=cache, tree=spec)
    target_probs = probabilities(out.logits[0], request.sampling)
    verifier = verify if watermark is None else watermark.verify
    return out, verifier(tree, target_probs, request.generator)
