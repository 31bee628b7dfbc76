"""ops.activations.gelu_tanh against PyTorch's tanh-approximated GELU."""

import pytest
import torch
import torch.nn.functional as F

from nimblelm.ops.activations import gelu_tanh, gelu_tanh_and_grad


def points(dtype):
    wide = torch.linspace(-30, 30, 20001, dtype=dtype)
    extremes = torch.tensor([-1e30, -1e4, -100.0, -0.0, 0.0, 1e-30, 100.0, 1e4, 1e30], dtype=dtype)
    return torch.cat([wide, extremes, torch.randn(1000, dtype=dtype, generator=torch.Generator().manual_seed(0))])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_gelu_tanh_equals_torch(dtype, tol):
    x = points(dtype)
    with torch.no_grad():
        fast = gelu_tanh(x)
    want = F.gelu(x, approximate="tanh")
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, want, rtol=tol, atol=tol)
    assert torch.equal(x, points(dtype))  # the input is not overwritten


def test_gelu_tanh_with_autograd_is_torchs_op_and_its_gradient():
    x = points(torch.float64).requires_grad_()
    gelu_tanh(x).sum().backward()
    y = x.detach().clone().requires_grad_()
    F.gelu(y, approximate="tanh").sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


def test_gelu_tanh_and_grad_matches_autograd():
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64, requires_grad=True)
    want = F.gelu(x, approximate="tanh")
    (slope,) = torch.autograd.grad(want.sum(), x)
    value, derivative = gelu_tanh_and_grad(x.detach())
    torch.testing.assert_close(value, want.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(derivative, slope, rtol=1e-12, atol=1e-12)
