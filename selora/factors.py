"""The two kinds of LoRA factor. A factor is a small module whose ``forward()`` returns its dense (rows, length)
rows: `DenseFactor` trains them directly (LoRA); `SpectralFactor` decodes the whole factor from a sparse spectral
matrix (SeLoRA, selora/bases/). An adapter method's config makes its factors (`LoRAConfig.make_factor`)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import bases
from .decode import IndexSet, SpectralDecode


class DenseFactor(nn.Module):
    """LoRA factor trained directly: ``weight`` is (rows, length)."""

    def __init__(self, rows: int, length: int, zero: bool, generator: torch.Generator, device: torch.device):
        super().__init__()
        self.length = length
        self.weight = nn.Parameter(torch.empty(rows, length, device=device))
        if device.type != "meta":
            bound = 0.0 if zero else 1.0 / math.sqrt(length)  # kaiming_uniform(a=sqrt(5)) bound, as in LoRA
            values = torch.rand(rows, length, generator=generator) * 2 * bound - bound
            self.weight.data.copy_(values)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rows; ``dtype`` is a hint (the caller casts)."""
        # A view, not the leaf itself: per-call gradient hooks (SRLoRA scoring) then live on this call's tensor
        # instead of piling up on the parameter.
        return self.weight.view_as(self.weight)

    @property
    def param(self) -> nn.Parameter:
        return self.weight

    def decode_value(self, value: torch.Tensor) -> torch.Tensor:
        """The (rows, length) float32 factor a parameter value stands for: the value itself."""
        return value.float()

    def fit_value(self, target: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """The parameter value whose factor is closest to ``target`` (rows, length): the target itself."""
        return target.float()


class SpectralFactor(nn.Module):
    """SeLoRA factor: the (rows, length) factor is ``basis``'s inverse 2-D transform of a sparse spectral matrix
    whose ``count`` learnable entries (``coefficients``, 1-D) sit at the shared ``index_set`` of this shape."""

    def __init__(self, rows: int, length: int, basis: str, index_set: IndexSet, zero: bool,
                 generator: torch.Generator, device: torch.device):
        super().__init__()
        self.rows, self.length, self.basis_name = rows, length, basis
        self.basis = bases.get(basis)
        self.index_set = index_set
        self.coefficients = nn.Parameter(torch.empty(index_set.count, device=device))
        self.decoded: torch.Tensor | None = None  # set by the model's decoder for one top-level forward only
        self.compute_dtype: torch.dtype | None = None  # the dtype of the last forward's input
        if device.type != "meta":
            # Kaiming-uniform on the spectral matrix (LoRA's bound for this fan-in), then calibrated so the
            # decoded factor has LoRA's variance 1 / (3 * length) whatever the ratio and basis: the expected
            # squared norm of the decoded factor is var(entry) * (sum of squared column norms at the index set).
            bound = 0.0 if zero else 1.0 / math.sqrt(length)
            if not zero:
                bound *= math.sqrt(rows * length / self.basis.column_energy(rows, length, index_set.indices))
            values = torch.rand(index_set.count, generator=generator) * 2 * bound - bound
            self.coefficients.data.copy_(values)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded (rows, length) factor: the rows the model's decoder handed out for the running top-level
        forward (already in ``dtype``), or else decoded now (float32)."""
        self.compute_dtype = dtype
        if self.decoded is not None:
            return self.decoded.view_as(self.decoded)
        indices = self.index_set.on(self.coefficients.device)
        return SpectralDecode.apply(self.coefficients, indices, self.basis, self.rows, self.length)

    @property
    def param(self) -> nn.Parameter:
        return self.coefficients

    def decode_value(self, value: torch.Tensor) -> torch.Tensor:
        return self.basis.decode(value, self.index_set.on(value.device), self.rows, self.length).float()

    def fit_value(self, target: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Least-squares entries for a (rows, length) target: the whole factor is re-fitted (in a 2-D basis the
        rows are not independent in the spectrum). From ``start`` the fit solves for the change only, so entries
        whose basis functions miss every changed row keep their exact values (orthonormal bases)."""
        indices = self.index_set.on(target.device)
        if start is None:
            return self.basis.fit(target, indices).float()
        change = self.basis.fit(target.float() - self.decode_value(start), indices)
        return start.float() + change.float()

    def extra_repr(self) -> str:
        return f"basis={self.basis_name}, rows={self.rows}, length={self.length}, entries={self.index_set.count}"
