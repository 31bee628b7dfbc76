"""FFN blocks: MoE against a per-token loop, load-balancing loss values."""

import torch

import nimblelm as nl
from nimblelm.layers.ffn import MixtureOfExperts


def test_moe_matches_per_token_loop():
    torch.manual_seed(0)
    for renormalize in (False, True):
        cfg = nl.ModelConfig(hidden_size=16, intermediate_size=24, num_experts=5, experts_top_k=2,
                             moe_renormalize=renormalize)
        moe = MixtureOfExperts(cfg).double()
        x = torch.randn(3, 7, 16, dtype=torch.float64)
        y, aux = moe(x)
        flat = x.reshape(-1, 16)
        expected = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            probs = torch.softmax(moe.router(flat[n]), -1)
            top = probs.topk(2)
            weights = top.values / top.values.sum() if renormalize else top.values
            for w, e in zip(weights, top.indices.tolist()):
                expected[n] += w * moe.experts[e](flat[n])[0]
        torch.testing.assert_close(y.reshape(-1, 16), expected)
        assert aux.item() >= 1.0 - 1e-9  # E * sum f_e P_e >= 1 with equality only when balanced


def test_moe_aux_loss_is_one_when_perfectly_balanced():
    cfg = nl.ModelConfig(hidden_size=4, num_heads=2, intermediate_size=8, num_experts=2, experts_top_k=1)
    moe = MixtureOfExperts(cfg).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.tensor([[[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]], dtype=torch.float64)
    _, aux = moe(x)
    torch.testing.assert_close(aux, torch.tensor(1.0, dtype=torch.float64))
    _, grad_aux = moe(x.requires_grad_())
    grad_aux.backward()
    assert moe.router.weight.grad is not None
