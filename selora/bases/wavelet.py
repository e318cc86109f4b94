"""SeLoRA_W: the factor is the single-level inverse 2-D discrete wavelet transform of its spectral matrix.

Layout (Mallat): along each axis of even size n the first n/2 positions are approximation coefficients and the
last n/2 detail coefficients, so the spectral matrix is [[LL, LH], [HL, HH]] with the same shape as the factor;
its blocks are pywt.idwt2's (cA, (cH, cV, cD)) with cH = the bottom-left block (detail along rows).

Boundaries: periodization (pywavelets' mode="periodization"): the signal is taken as periodic, so an axis of even
size n has exactly n/2 + n/2 coefficients and the transform is an exact, square linear map for every even size
(576, 1536, 11008, 14336 and r = 8..64 alike), whatever the filter length. An axis of odd size (a rank of 3, say)
is left untransformed: the map is the identity along it. One level: the paper states the inverse 2-D DWT without
a level; one level keeps every even size valid and each basis function local.

Along the long axis the synthesis is polyphase: output pair (2m, 2m + 1) is a (2J -> 2) matrix applied to
J circularly shifted copies of the approximation and detail halves (J = filter length / 2), then a roll by
J - 1 aligns it with pywavelets. Along the short axis (the rank) the 1-D synthesis is a small dense matrix.
No convolution kernels: cuDNN would run them in TF32 and the map would no longer be exact.
"""
from __future__ import annotations

import functools

import torch

from .basis import CACHE_SIZE, Basis

# Synthesis (reconstruction) filters as pywavelets 1.x defines them (tests/test_bases.py checks every value).
FILTERS = {
    "haar": ([0.7071067811865476, 0.7071067811865476], [0.7071067811865476, -0.7071067811865476]),
    "db4": ([0.2303778133088965, 0.7148465705529157, 0.6308807679298589, -0.027983769416859854,
             -0.18703481171909309, 0.030841381835560764, 0.0328830116668852, -0.010597401785069032],
            [-0.010597401785069032, -0.0328830116668852, 0.030841381835560764, 0.18703481171909309,
             -0.027983769416859854, -0.6308807679298589, 0.7148465705529157, -0.2303778133088965]),
    "bior2.2": ([0.0, 0.3535533905932738, 0.7071067811865476, 0.3535533905932738, 0.0, 0.0],
                [0.0, 0.1767766952966369, 0.3535533905932738, -1.0606601717798212, 0.3535533905932738,
                 0.1767766952966369]),
    "coif1": ([-0.07273261951252645, 0.3378976624574818, 0.8525720202116004, 0.3848648468648578,
               -0.07273261951252645, -0.015655728135791993],
              [-0.015655728135791993, 0.07273261951252645, 0.3848648468648578, -0.8525720202116004,
               0.3378976624574818, 0.07273261951252645]),
}


class Wavelet(Basis):
    """Single-level periodized 2-D inverse DWT with the synthesis filter bank ``FILTERS[name]``."""

    def __init__(self, name: str):
        self.name = name
        low, high = FILTERS[name]
        self.taps = len(low) // 2
        # (2J, 2): row j multiplies the approximation shifted by j, row J + j the detail; column q is phase q.
        bank = torch.tensor([[low[2 * j], low[2 * j + 1]] for j in range(self.taps)]
                            + [[high[2 * j], high[2 * j + 1]] for j in range(self.taps)], dtype=torch.float64)
        self._bank = bank
        self.orthonormal = not name.startswith("bior")

    @functools.lru_cache(maxsize=CACHE_SIZE)
    def _bank_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self._bank.to(device, dtype)

    # ----- 1-D along the last axis ------------------------------------------------------------------------
    def _synthesize_last(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        if n % 2:
            return x
        half = n // 2
        a, d = x[..., :half], x[..., half:]
        pieces = [torch.roll(a, j, dims=-1) if j else a for j in range(self.taps)]
        pieces += [torch.roll(d, j, dims=-1) if j else d for j in range(self.taps)]
        z = torch.stack(pieces, dim=-1) @ self._bank_on(x.device, x.dtype)  # (..., half, 2)
        z = z.reshape(*x.shape[:-1], n)
        return torch.roll(z, -(self.taps - 1), dims=-1) if self.taps > 1 else z

    def _adjoint_last(self, y: torch.Tensor) -> torch.Tensor:
        n = y.shape[-1]
        if n % 2:
            return y
        half = n // 2
        z = torch.roll(y, self.taps - 1, dims=-1) if self.taps > 1 else y
        p = z.reshape(*y.shape[:-1], half, 2) @ self._bank_on(y.device, y.dtype).T  # (..., half, 2J)
        a = sum(torch.roll(p[..., j], -j, dims=-1) if j else p[..., j] for j in range(self.taps))
        d = sum(torch.roll(p[..., self.taps + j], -j, dims=-1) if j else p[..., self.taps + j]
                for j in range(self.taps))
        return torch.cat([a, d], dim=-1)

    @functools.lru_cache(maxsize=CACHE_SIZE)
    def row_matrix(self, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(rows, rows) 1-D synthesis along the rank axis: column k is the signal of coefficient k."""
        eye = torch.eye(rows, dtype=torch.float64)
        return self._synthesize_last(eye).T.contiguous().to(device, dtype)

    # ----- 2-D --------------------------------------------------------------------------------------------
    def synthesize(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        rows = spectrum.shape[-2]
        dense = self._synthesize_last(spectrum)
        return self.row_matrix(rows, dense.device, dense.dtype) @ dense if rows % 2 == 0 else dense

    def synthesize_adjoint(self, dense: torch.Tensor) -> torch.Tensor:
        rows = dense.shape[-2]
        if rows % 2 == 0:
            dense = self.row_matrix(rows, dense.device, dense.dtype).T @ dense
        return self._adjoint_last(dense)

    def column_energy(self, rows: int, length: int, indices: torch.Tensor) -> float:
        # A column's norm is the product of its two 1-D norms, and a 1-D norm depends only on the band.
        def band_norms(n: int) -> torch.Tensor:
            if n % 2:
                return torch.ones(n, dtype=torch.float64)
            probe = torch.zeros(2, n, dtype=torch.float64)
            probe[0, 0], probe[1, n // 2] = 1.0, 1.0
            low, high = self._synthesize_last(probe).pow(2).sum(1)
            return torch.cat([low.expand(n // 2), high.expand(n // 2)])

        per_row, per_col = band_norms(rows), band_norms(length)
        indices = indices.cpu()
        return float((per_row[indices // length] * per_col[indices % length]).sum())


CACHES = (Wavelet._bank_on, Wavelet.row_matrix)  # shared by all wavelets; freed by selora.bases.clear_caches
