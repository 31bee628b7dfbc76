"""Several ``nn.Linear`` that read the same input, stored as column blocks of ONE matrix.

Batch-1 decoding on CPU is a chain of GEMVs that stream weights from memory, and how fast a
GEMV streams depends on the layout: for the expanding shapes of q/k/v and gate/up, ``x @ W``
with W stored [in, out] runs at 18-26 GB/s on our machine against 11-15 GB/s through
``F.linear`` on the usual [out, in] storage, and one fused [in, q+k+v] matrix streams faster
than three small ones (measured with /tmp-style GEMV loops; see docs/performance.md).

:class:`PackedLinears` therefore allocates one contiguous [in, sum(out)] matrix, copies the
linears' weights into its column blocks and points each ``linear.weight`` at its block
(``weight.data = block.t()``): same Parameter objects, same names and shapes in the
state dict, no extra memory. Training keeps calling each linear (autograd reaches the
Parameters); inference calls :meth:`PackedLinears.__call__`, one matmul for all of them.

If a weight stops living in the packed matrix (``model.double()``, a reassigned
Parameter, ``load_state_dict(assign=True)``), :meth:`usable` turns False and callers fall
back to the separate linears, so results never go stale; ``pack()`` re-establishes it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class PackedLinears:
    """Linears over the same input width, packed column-wise. Not an nn.Module: it owns no
    parameters (the linears keep theirs), so it adds nothing to the state dict."""

    def __init__(self, *linears: nn.Linear):
        widths = {lin.in_features for lin in linears}
        if len(widths) != 1:
            raise ValueError(f"packed linears must share their input width, got {sorted(widths)}")
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self.pack()

    @torch.no_grad()
    def pack(self) -> None:
        """(Re)build the packed matrix from the linears' current weights and re-point them."""
        first = self.linears[0].weight
        matrix = torch.empty(first.shape[1], sum(self.sizes), dtype=first.dtype, device=first.device)
        has_bias = any(lin.bias is not None for lin in self.linears)
        bias = torch.zeros(sum(self.sizes), dtype=first.dtype, device=first.device) if has_bias else None
        offset = 0
        for lin, size in zip(self.linears, self.sizes):
            block = matrix[:, offset:offset + size]
            block.copy_(lin.weight.t())
            lin.weight.data = block.t()  # [out, in] view with strides (1, total)
            if lin.bias is not None:
                bias[offset:offset + size].copy_(lin.bias)
                lin.bias.data = bias[offset:offset + size]
            offset += size
        self.matrix, self.bias = matrix, bias  # [in, sum(out)], [sum(out)] or None
        self._addresses = self._current_addresses()

    def __deepcopy__(self, memo) -> "PackedLinears":
        """``copy.deepcopy`` clones each Parameter on its own; the copy packs its own clones."""
        return PackedLinears(*copy.deepcopy(self.linears, memo))

    def _current_addresses(self) -> list[int]:
        addresses = []
        for lin in self.linears:
            addresses.append(lin.weight.data_ptr())
            addresses.append(lin.bias.data_ptr() if lin.bias is not None else 0)
        return addresses

    def usable(self) -> bool:
        """True when no gradient is wanted and every weight still lives in the packed matrix."""
        if torch.is_grad_enabled() and self.linears[0].weight.requires_grad:
            return False
        return self._current_addresses() == self._addresses and self.linears[0].weight.dtype == self.matrix.dtype

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., in] -> one output per linear, [..., out_i]. Uses the packed matrix when
        :meth:`usable`, the separate linears otherwise (same values either way)."""
        if not self.usable():
            return [lin(x) for lin in self.linears]
        if self.bias is None:
            y = x @ self.matrix
        else:
            y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.matrix).view(*x.shape[:-1], -1)
        if len(self.linears) == 1:
            return [y]
        return list(y.split(self.sizes, dim=-1))


class RepacksOnConversion:
    """Mixin for modules holding :class:`PackedLinears`: after ``.to()`` / ``.double()`` /
    ``.half()`` (which give every weight its own new storage) the packs are rebuilt, so
    converted models keep the fast path. Parameter objects stay the same."""

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        for value in vars(self).values():
            if isinstance(value, PackedLinears):
                value.pack()
        return result
