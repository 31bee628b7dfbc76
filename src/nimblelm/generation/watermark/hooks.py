"""The watermark in the autoregressive loop: one :class:`WatermarkSession` per batch row.

Each row's context is that row's own tokens (its prompt without left padding, then what it
generated), so a left-padded batch watermarks every row exactly as it would be alone.
"""

from __future__ import annotations

import torch

from ..sampling import probabilities
from .session import WatermarkSession, apply_watermark, check_watermark


def row_sessions(request) -> list[WatermarkSession] | None:
    """Sessions for the request's rows, or None without a watermark (validates it first)."""
    config = check_watermark(request.watermark, request.sampling)
    if config is None:
        return None
    return [WatermarkSession(config, request.tokens[b][request.token_mask[b]].tolist())
            for b in range(request.batch)]


def watermarked_probabilities(sessions: list[WatermarkSession], logits: torch.Tensor, sampling) -> torch.Tensor:
    """Next-token distributions [B, V] (float64): processed p, then each row's tournament."""
    probs = probabilities(logits.double(), sampling)
    contexts, marked = [], []
    for session in sessions:
        ctx, mark = session.node_states([[]])
        contexts.append(ctx)
        marked.extend(mark)
    return apply_watermark(sessions[0].config, probs, torch.cat(contexts), marked)


def sample_watermarked(sessions: list[WatermarkSession], logits: torch.Tensor, sampling,
                       generator: torch.Generator | None) -> torch.Tensor:
    """One token per row [B] from the watermarked distributions; the sessions accept them."""
    probs = watermarked_probabilities(sessions, logits, sampling)
    chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
    for session, token in zip(sessions, chosen.tolist()):
        session.sync(session.tokens + [token])
    return chosen
