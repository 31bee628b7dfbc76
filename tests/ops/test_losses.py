"""linear_cross_entropy (blocked, gradients in the forward pass) against the unfused oracle."""

import pytest
import torch

from nimblelm.ops.losses import (IGNORE_INDEX, linear_cross_entropy, linear_soft_cross_entropy,
                                  reference_linear_cross_entropy, reference_linear_soft_cross_entropy)


def _inputs(M, D, V, dtype, seed=0, ignored=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, D, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(V, (M,), generator=g)
    targets[list(ignored)] = IGNORE_INDEX
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets, **kw):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, **kw)
    (3.0 * loss).backward()  # an upstream gradient other than 1 must scale both gradients
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("block_rows", [1, 7, 64, None])
def test_matches_the_unfused_cross_entropy_in_float64(block_rows):
    hidden, weight, targets = _inputs(50, 12, 37, torch.float64, ignored=(3, 4, 49))
    ref = _loss_and_grads(reference_linear_cross_entropy, hidden, weight, targets)
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, block_rows=block_rows)
    assert got[0].dtype == torch.float64
    assert abs(float(got[0]) - float(ref[0])) < 1e-12
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == b.dtype and torch.allclose(a, b, atol=1e-12, rtol=1e-10)


def test_float32_at_mqar_size_and_large_logits():
    hidden, weight, targets = _inputs(300, 32, 2048, torch.float32, seed=1, ignored=range(0, 300, 5))
    with torch.no_grad():
        weight.mul_(30.0)  # logits in the hundreds: the max subtraction must keep exp finite
    ref = _loss_and_grads(reference_linear_cross_entropy, hidden, weight, targets)
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, block_rows=64)
    assert torch.isfinite(got[0]) and abs(float(got[0]) - float(ref[0])) <= 1e-5 * abs(float(ref[0]))
    for a, b in zip(got[1:], ref[1:]):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_without_autograd_and_with_only_one_input_requiring_grad():
    hidden, weight, targets = _inputs(20, 8, 30, torch.float64, seed=2)
    ref = reference_linear_cross_entropy(hidden, weight, targets)
    with torch.no_grad():
        assert abs(float(linear_cross_entropy(hidden, weight, targets, block_rows=6)) - float(ref)) < 1e-6
        loss, argmax = linear_cross_entropy(hidden, weight, targets, block_rows=6, return_argmax=True)
        assert abs(float(loss) - float(ref)) < 1e-6 and torch.equal(argmax, (hidden @ weight.t()).argmax(-1))
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, targets, block_rows=6)
    loss.backward()
    hidden_ref = hidden.detach().clone().requires_grad_()
    reference_linear_cross_entropy(hidden_ref, frozen, targets).backward()
    assert torch.allclose(hidden.grad, hidden_ref.grad, atol=1e-12)


def test_bfloat16_inputs_softmax_in_float32():
    hidden, weight, targets = _inputs(40, 16, 64, torch.float32, seed=3)
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    got = _loss_and_grads(linear_cross_entropy, h16, w16, targets, block_rows=16)
    ref = _loss_and_grads(reference_linear_cross_entropy, h16, w16, targets)
    assert got[0].dtype == torch.float32 and abs(float(got[0]) - float(ref[0])) < 1e-3
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == torch.bfloat16 and (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()


def test_no_rows():
    hidden, weight, targets = _inputs(0, 4, 9, torch.float64)
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert float(loss.detach()) == 0.0 and loss.dtype == torch.float64 and not weight.grad.any()


def test_every_row_ignored_gives_zero_loss_and_gradients():
    hidden, weight, targets = _inputs(6, 4, 9, torch.float64, ignored=range(6))
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_bad_inputs_name_what_to_change():
    hidden, weight, targets = _inputs(4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="targets must be int64"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match=r"hidden \[M, D\] and weight \[V, D\]"):
        linear_cross_entropy(hidden, weight[:, :2], targets)


@pytest.mark.parametrize("block_rows", [1, 5, 64])
def test_soft_cross_entropy_matches_the_unfused_form_on_strided_targets(block_rows):
    """hidden [B, n, D] against probs[:, 1:] of a [B, n + 1, V] tensor (a strided view), blocks
    crossing batch rows; the head frozen, as in drafter training (only hidden gets a gradient)."""
    g = torch.Generator().manual_seed(4)
    B, n, D, V = 3, 7, 6, 11
    hidden = torch.randn(B, n, D, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, n + 1, V, generator=g, dtype=torch.float64).softmax(-1)
    probs = teacher[:, 1:]
    loss, argmax = linear_soft_cross_entropy(hidden, weight, probs, block_rows=block_rows)
    (2.0 * loss).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    ref = reference_linear_soft_cross_entropy(hidden.reshape(-1, D), weight, probs.reshape(-1, V))
    (2.0 * ref).backward()
    assert abs(loss.item() - ref.item()) < 1e-12
    assert torch.allclose(got, hidden.grad, atol=1e-12, rtol=1e-10)
    assert torch.equal(argmax, (hidden.detach() @ weight.t()).argmax(-1))


def test_soft_cross_entropy_weight_gradient_and_unnormalised_rows():
    hidden, weight, _ = _inputs(9, 5, 13, torch.float64, seed=5)
    probs = torch.rand(9, 13, dtype=torch.float64)  # rows summing to anything
    ref = _loss_and_grads(lambda h, w, p: reference_linear_soft_cross_entropy(h, w, p), hidden, weight, probs)
    got = _loss_and_grads(lambda h, w, p: linear_soft_cross_entropy(h, w, p, block_rows=4)[0], hidden, weight, probs)
    assert abs(float(got[0]) - float(ref[0])) < 1e-12
    for a, b in zip(got[1:], ref[1:]):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="probs must be"):
        linear_soft_cross_entropy(hidden, weight, probs[:, :12])
