"""Drafters for tests shared across test packages."""

import torch

import nimblelm as nl


def noisy_copy(model: nl.LanguageModel, scale: float, seed: int = 0) -> nl.LanguageModel:
    """A drafter between perfect and random: the target's weights plus noise."""
    torch.manual_seed(seed)
    draft = nl.LanguageModel(model.config).to(model.embed.weight.dtype).eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn_like(p))
    return draft
