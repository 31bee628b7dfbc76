"""The attention mixer against a naive per-query softmax loop (the oracle)."""

import math

import pytest
import torch

import nimblelm as nl
from nimblelm.cache import ForwardInfo
from nimblelm.layers.attention import Attention
from nimblelm.layers.rotary import apply_rope, inverse_frequencies, rope_cos_sin


def naive_attention(layer: Attention, x: torch.Tensor, positions: torch.Tensor, window=None) -> torch.Tensor:
    """Per (batch, head, query) loop: RoPE by explicit 2-D rotations, softmax over allowed keys."""
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(B, T, H, D)
    k = layer.k_proj(x).view(B, T, Hkv, D)
    v = layer.v_proj(x).view(B, T, Hkv, D)
    theta = 10000.0
    def rotate(vec, pos):
        out = vec.clone()
        for i in range(D // 2):
            angle = pos * theta ** (-2 * i / D)
            c, s = math.cos(angle), math.sin(angle)
            a, b = vec[i], vec[i + D // 2]
            out[i], out[i + D // 2] = a * c - b * s, a * s + b * c
        return out
    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            keys = torch.stack([rotate(k[b, j, g], int(positions[b, j])) for j in range(T)])
            for i in range(T):
                qi = rotate(q[b, i, h], int(positions[b, i]))
                allowed = [j for j in range(i + 1) if window is None or i - j < window]
                scores = torch.stack([qi @ keys[j] for j in allowed]) / math.sqrt(D)
                weights = scores.softmax(0)
                out[b, i, h] = sum(w * v[b, j, g] for w, j in zip(weights, allowed))
            if layer.gate_proj is not None:
                out[b, :, h] *= torch.sigmoid(layer.gate_proj(x[b])[:, h])[:, None]
    return layer.o_proj(out.reshape(B, T, H * D))


@pytest.mark.parametrize("window,gate,kv_heads", [(None, False, 4), (None, True, 2), (3, False, 1), (5, True, 2)])
def test_attention_matches_naive_loop(window, gate, kv_heads):
    torch.manual_seed(0)
    cfg = nl.ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=kv_heads, attn_output_gate=gate)
    layer = Attention(cfg, 0, window=window).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    positions = torch.arange(9).expand(2, 9)
    info = ForwardInfo(positions=positions, key_positions=positions)
    info.cos, info.sin = rope_cos_sin(positions, inverse_frequencies(cfg.head_dim, cfg.rope_theta, torch.float64), torch.float64)
    y, _ = layer(x, info)
    torch.testing.assert_close(y, naive_attention(layer, x, positions, window), rtol=1e-10, atol=1e-10)


def test_rope_is_a_rotation_relative_in_position():
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    inv_freq = inverse_frequencies(16, 10000.0, torch.float64)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), inv_freq, torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), inv_freq, torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100))
    cq, sq = rope_cos_sin(torch.tensor([[37]]), inv_freq, torch.float64)
    torch.testing.assert_close(apply_rope(q, cq, sq).norm(), q.norm())


def test_sliding_window_decoding_skips_slots_outside_the_window():
    """Prefill then token-by-token decoding (left-padded batch of two lengths, a window much
    shorter than the context) equals the full forward, while decoding attends only to the
    slots inside the window."""
    torch.manual_seed(0)
    model = nl.LanguageModel(nl.ModelConfig.from_preset("local-attention-tiny")).double().eval()
    window = model.config.sliding_window
    full = torch.randint(0, model.config.vocab_size, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :6] = False  # row 1: six left-padding tokens
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(full, positions, token_mask=mask).logits
        cache = model.make_cache(2, 40)
        model(full[:, :30], positions[:, :30], cache=cache, token_mask=mask[:, :30])
        firsts = []
        for t in range(30, 40):
            info = cache.prepare(positions[:, t:t + 1])
            firsts.append(info.first_visible_slot(window))
            cache.pending = 0  # undo the probe's reservation; the model call below reserves again
            out = model(full[:, t:t + 1], positions[:, t:t + 1], cache=cache)
            torch.testing.assert_close(out.logits[:, 0], ref[:, t], rtol=1e-10, atol=1e-10)
    assert firsts == [t - window + 1 for t in range(30, 40)]  # row 0 (no padding) reaches furthest back
