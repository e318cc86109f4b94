"""What every SeLoRA basis is: a linear map from a sparse spectral matrix to a dense factor, with its adjoint.

A factor is stored as its rows: A (r, in) or B^T (r, out), so every factor is a (rows, length) matrix and a
basis maps a spectral matrix of shape ``spectral_shape(rows, length)`` to it. Only ``count`` entries of the
spectral matrix are learnable; they sit at an index set (flat, sorted positions in the spectral matrix) that
is drawn once per factor shape from the seed and shared by every factor of that shape (the paper's global
shared index set Omega).

A subclass supplies the whole-matrix transform (``synthesize``) and its adjoint; this class turns them into
decode (entries -> dense), adjoint (dense gradient -> entry gradient) and fit (dense target -> entries, least
squares). Transforms run in float32, or float64 when given float64; callers cast the result.
"""
from __future__ import annotations

import math

import torch

# Entries each basis cache keeps (lru: per distinct size, device and dtype; a model has a handful of sizes).
CACHE_SIZE = 64


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (reference computations); everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Basis:
    """One spectral basis. Subclasses set ``name`` and implement `synthesize` / `synthesize_adjoint`."""

    name: str = ""
    orthonormal: bool = False  # True: the synthesis is orthogonal, so fit is the adjoint read at the indices
    row_wise: bool = False     # True: rows are transformed independently (this project's own 1-D variants)

    # ----- the transform (subclasses) ----------------------------------------------------------------------
    def spectral_shape(self, rows: int, length: int) -> tuple[int, int]:
        """Shape of the spectral matrix of a (rows, length) factor."""
        return rows, length

    def synthesize(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        """(..., rows, n) spectral matrices -> (..., rows, length) dense factors (the inverse transform)."""
        raise NotImplementedError

    def synthesize_adjoint(self, dense: torch.Tensor) -> torch.Tensor:
        """(..., rows, length) -> (..., rows, n): the transpose of `synthesize` (not its inverse in general)."""
        raise NotImplementedError

    def column_energy(self, rows: int, length: int, indices: torch.Tensor) -> float:
        """Sum of the squared norms of the synthesis columns at ``indices``: the decoded factor's expected
        squared Frobenius norm per unit entry variance (used by the init's variance calibration)."""
        if self.orthonormal:
            return float(indices.numel())
        raise NotImplementedError

    # ----- counts and index sets ----------------------------------------------------------------------------
    def count(self, rows: int, length: int, spectral_ratio: float, per_row: int | None = None) -> int:
        """Learnable entries of a (rows, length) factor: floor(spectral_ratio * rows * length), or
        ``per_row * rows`` when given; at least 1. Raises ValueError when the spectral matrix is too small."""
        n_rows, n_cols = self.spectral_shape(rows, length)
        if per_row is not None:
            count = per_row * rows
        else:  # the tiny relative slack keeps e.g. 0.29 * 100 at 29 despite binary rounding
            count = max(1, math.floor(spectral_ratio * rows * length * (1 + 1e-12)))
        if count > n_rows * n_cols:
            raise ValueError(f"{count} spectral entries asked for a {rows}x{length} factor, but basis {self.name!r} "
                             f"has only {n_rows * n_cols}; lower spectral_ratio or n_coefficients")
        return count

    def draw_indices(self, rows: int, length: int, count: int, generator: torch.Generator,
                     shared_rows: bool = True) -> torch.Tensor:
        """The index set: ``count`` distinct flat positions of the spectral matrix, uniformly at random, sorted.
        int64 (count,). ``shared_rows`` only matters for row-wise bases."""
        n_rows, n_cols = self.spectral_shape(rows, length)
        return torch.randperm(n_rows * n_cols, generator=generator)[:count].sort().values

    # ----- decode / adjoint / fit -------------------------------------------------------------------------
    def scatter(self, entries: torch.Tensor, indices: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        """(..., count) entries -> (..., rows, n) spectral matrices, zero off the index set."""
        n_rows, n_cols = self.spectral_shape(rows, length)
        flat = entries.new_zeros(*entries.shape[:-1], n_rows * n_cols)
        flat = flat.scatter(-1, indices.expand_as(entries), entries)
        return flat.view(*entries.shape[:-1], n_rows, n_cols)

    def decode(self, entries: torch.Tensor, indices: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        """(..., count) entries at ``indices`` (count,) or (..., count) -> (..., rows, length) dense factors."""
        entries = entries.to(working_dtype(entries))
        # Autocast off: under a bf16 autocast the transforms' matmuls would silently run in bf16.
        with torch.autocast(entries.device.type, enabled=False):
            return self.synthesize(self.scatter(entries, indices.to(entries.device), rows, length), length)

    def adjoint(self, grad: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(..., rows, length) -> (..., count): the transpose of `decode` (how gradients reach the entries)."""
        grad = grad.to(working_dtype(grad))
        with torch.autocast(grad.device.type, enabled=False):
            spectrum = self.synthesize_adjoint(grad)
        flat = spectrum.reshape(*spectrum.shape[:-2], -1)
        indices = indices.to(flat.device)
        return flat.gather(-1, indices.expand(*flat.shape[:-1], indices.shape[-1]))

    def fit(self, target: torch.Tensor, indices: torch.Tensor, start: torch.Tensor | None = None,
            tolerance: float = 1e-10, max_iterations: int = 500) -> torch.Tensor:
        """Least-squares entries: argmin_c ||decode(c) - target||_F. target (rows, length) -> (count,) float32
        (float64 if given float64).

        Orthonormal bases: the adjoint read at the indices (exact). Otherwise conjugate gradients on the normal
        equations, in float64, from ``start`` (e.g. the current entries) or zero; where the columns at the index
        set are dependent (fft2's conjugate pairs) this converges to the least-squares solution nearest ``start``.
        """
        out_dtype = working_dtype(target)
        rows, length = target.shape
        if self.orthonormal:
            return self.adjoint(target, indices).to(out_dtype)
        target = target.double()
        indices = indices.to(target.device)
        x = start.double().clone() if start is not None else target.new_zeros(indices.numel())
        b = self.adjoint(target, indices)
        residual = b - self.adjoint(self.decode(x, indices, rows, length), indices)
        direction = residual.clone()
        norm = residual.dot(residual)
        stop = (tolerance * b.norm()) ** 2
        for _ in range(max_iterations):
            if norm <= stop:
                break
            step = self.adjoint(self.decode(direction, indices, rows, length), indices)
            alpha = norm / direction.dot(step)
            x += alpha * direction
            residual -= alpha * step
            new_norm = residual.dot(residual)
            direction = residual + (new_norm / norm) * direction
            norm = new_norm
        return x.to(out_dtype)
