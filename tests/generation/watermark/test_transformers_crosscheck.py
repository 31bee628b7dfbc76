"""Outside check: given identical g-values, our tournament equals transformers'
SynthIDTextWatermarkLogitsProcessor update (their own g-values fed to our transform)."""

from __future__ import annotations

import pytest
import torch

from nimblelm.generation.watermark.tournament import tournament

transformers = pytest.importorskip("transformers")


def test_tournament_equals_transformers_update_scores():
    from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

    keys = [654, 400, 836, 123, 340, 443, 597, 160, 57, 29, 590, 639, 13, 715, 468, 990, 966, 226, 324, 585, 118, 504,
            421, 521, 129, 669, 732, 225, 90, 960]
    proc = SynthIDTextWatermarkLogitsProcessor(ngram_len=5, keys=keys, sampling_table_size=2**16,
                                               sampling_table_seed=0, context_history_size=1024, device="cpu")
    batch, vocab = 4, 200
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (batch, 4), generator=gen)
    ngram_keys, _ = proc._compute_keys(context, torch.arange(vocab).expand(batch, -1))
    their_g = proc.sample_g_values(ngram_keys)  # [B, V, depth]
    logits = torch.randn(batch, vocab, generator=gen, dtype=torch.float64) * 2
    theirs = proc.update_scores(logits, their_g).exp()
    ours = tournament(logits.softmax(-1), their_g.permute(0, 2, 1))  # g [B, m, V]
    diff = float((theirs - ours).abs().max())
    print(f"max |transformers - nimblelm| = {diff:.3e}")
    assert diff < 1e-12
