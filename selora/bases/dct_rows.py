"""This project's own SeLoRA variant (not the paper's): each factor row is decoded on its own from a 1-D spectrum.

``dct_rows``: row i is the orthonormal DCT-III (inverse DCT-II) of row i of the spectral matrix; the basis is
complete, so spectral_ratio 1.0 is LoRA re-parameterised. ``dft_rows``: the real part of the inverse DFT
(FourierFT-style), with only length // 2 + 1 distinct real frequencies per row, so the spectral matrix is
(rows, length // 2 + 1). These were selora's bases before the paper's 2-D transforms (selora < 0.2 called them
"dct" and "dft"; those names still load). Each row keeps the same number of entries, K per row: one set of K
column positions for all rows (``shared_locations``) or one per row.
"""
from __future__ import annotations

import functools
import math

import torch

from .basis import CACHE_SIZE, Basis, working_dtype


@functools.lru_cache(maxsize=CACHE_SIZE)
def _dct_phases(length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency complex factors that turn the orthonormal DCT into one real FFT of length 2L.

    inverse:  x_j = Re(sum_k s_k X_k e^{i pi k (2j+1) / 2L}) = irfft(Z, 2L)[j] with Z_k = L s_k e^{i pi k/2L} X_k
              (doubled at k = 0, where irfft counts the term once);
    forward:  X_k = s_k Re(e^{-i pi k/2L} rfft(x, 2L)_k);  s_0 = sqrt(1/L), s_k = sqrt(2/L).
    """
    k = torch.arange(length, dtype=torch.float64)
    scale = torch.full((length,), math.sqrt(2.0 / length), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / length)
    angle = math.pi * k / (2 * length)
    inverse = torch.polar(length * scale, angle)
    inverse[0] *= 2
    forward = torch.polar(scale, -angle)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return inverse.to(device, complex_dtype), forward.to(device, complex_dtype)


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim: one real FFT of length 2L."""
    length, dtype = x.shape[-1], working_dtype(x)
    _, forward = _dct_phases(length, x.device, dtype)
    return (torch.fft.rfft(x.to(dtype), n=2 * length, dim=-1)[..., :length] * forward).real


def idct(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct` (orthonormal DCT-III) along the last dim: one inverse real FFT of length 2L."""
    length, dtype = coefficients.shape[-1], working_dtype(coefficients)
    inverse, _ = _dct_phases(length, coefficients.device, dtype)
    spectrum = torch.nn.functional.pad(coefficients.to(dtype) * inverse, (0, 1))
    return torch.fft.irfft(spectrum, n=2 * length, dim=-1)[..., :length]


@functools.lru_cache(maxsize=CACHE_SIZE)
def _dft_norm(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-frequency factor that makes the cosine basis vector at u unit-norm under irfft/rfft."""
    norm = torch.full((length // 2 + 1,), math.sqrt(length / 2.0), dtype=torch.float64)
    norm[0] = math.sqrt(length)
    if length % 2 == 0:
        norm[-1] = math.sqrt(length)
    return norm.to(device, dtype)


CACHES = (_dct_phases, _dft_norm)  # freed by selora.bases.clear_caches


class RowBasis(Basis):
    """Row-wise 1-D bases: K entries per row, the same K for every row."""

    row_wise = True
    orthonormal = True  # on the positions they allow (every dft_rows column is a unit-norm cosine)

    def count(self, rows: int, length: int, spectral_ratio: float, per_row: int | None = None) -> int:
        n_cols = self.spectral_shape(rows, length)[1]
        per_row = per_row if per_row is not None else max(1, round(spectral_ratio * length))
        if per_row > n_cols:
            hint = " (dft_rows has only length // 2 + 1 real frequencies; use dct_rows for more)" if self.name == "dft_rows" else ""
            raise ValueError(f"{per_row} spectral coefficients asked for a row of length {length}, but basis "
                             f"{self.name!r} has only {n_cols}{hint}; lower spectral_ratio or n_coefficients")
        return per_row * rows

    def draw_indices(self, rows: int, length: int, count: int, generator: torch.Generator,
                     shared_rows: bool = True) -> torch.Tensor:
        n_cols, per_row = self.spectral_shape(rows, length)[1], count // rows
        if shared_rows:
            columns = torch.randperm(n_cols, generator=generator)[:per_row].sort().values.expand(rows, per_row)
        else:
            columns = torch.stack([torch.randperm(n_cols, generator=generator)[:per_row].sort().values
                                   for _ in range(rows)])
        return (columns + n_cols * torch.arange(rows).unsqueeze(1)).reshape(-1)


class DCTRows(RowBasis):
    name = "dct_rows"

    def synthesize(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        return idct(spectrum)

    def synthesize_adjoint(self, dense: torch.Tensor) -> torch.Tensor:
        return dct(dense)


class DFTRows(RowBasis):
    name = "dft_rows"

    def spectral_shape(self, rows: int, length: int) -> tuple[int, int]:
        return rows, length // 2 + 1

    def synthesize(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        norm = _dft_norm(length, spectrum.device, spectrum.dtype)
        return torch.fft.irfft(spectrum * norm, n=length, dim=-1)

    def synthesize_adjoint(self, dense: torch.Tensor) -> torch.Tensor:
        length = dense.shape[-1]
        return torch.fft.rfft(dense, dim=-1).real / _dft_norm(length, dense.device, dense.dtype)
