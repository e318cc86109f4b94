"""SeLoRA_F: the factor is the real part of the inverse 2-D FFT of its (real, sparse) spectral matrix.

Normalisation "ortho" (1/sqrt(rows * length)). The map F -> Re(ifft2(F)) is self-adjoint on real matrices:
<G, Re(W F W')> = <Re(W G W'), F> because the inverse-DFT matrices W, W' are symmetric, so the same transform
serves as its own adjoint. It is not orthogonal: entries at conjugate positions (k, l) and (-k, -l) decode to the
same cosine, so the columns have squared norm 1/2 (1 at self-conjugate positions) and `fit` solves least squares.
"""
from __future__ import annotations

import torch

from .basis import Basis


class Fourier2D(Basis):
    name = "fft2"
    orthonormal = False

    def synthesize(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        return torch.fft.ifft2(spectrum, norm="ortho").real

    def synthesize_adjoint(self, dense: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft2(dense, norm="ortho").real

    def column_energy(self, rows: int, length: int, indices: torch.Tensor) -> float:
        indices = indices.cpu()
        k, l = indices // length, indices % length
        self_conjugate = ((2 * k) % rows == 0) & ((2 * l) % length == 0)
        return float(0.5 * indices.numel() + 0.5 * self_conjugate.sum())
