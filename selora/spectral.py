"""Spectral bases for SeLoRA: frequency locations, decode (coefficients -> dense rows) and fit (rows -> coefficients).

Every factor row is a 1-D signal of length L (``in_features`` for a row of A, ``out_features`` for a column
of B). Its spectrum is zero except at K fixed locations, and the row is the inverse transform of that
spectrum. Both bases are orthonormal on the locations they allow, so `fit` (least squares onto the span of
the chosen basis vectors) is just the forward transform read at the locations.

All rows of a factor are decoded in one batched transform: (rows, K) coefficients -> (rows, L) dense.
Transforms run in float32 (torch.fft has no bfloat16 kernels), or float64 when given float64; callers cast the result.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def max_locations(length: int, basis: str) -> int:
    """How many distinct basis vectors a row of this length has in ``basis``."""
    return length if basis == "dct" else length // 2 + 1


def coefficient_count(length: int, spectral_ratio: float, n_coefficients: int | None, basis: str) -> int:
    """Trainable coefficients per row: ``n_coefficients`` if given, else round(ratio * length), at least 1."""
    count = n_coefficients if n_coefficients is not None else max(1, round(spectral_ratio * length))
    limit = max_locations(length, basis)
    if count > limit:
        hint = " (the dft basis has only length // 2 + 1 real frequencies; use basis='dct' for more)" if basis == "dft" else ""
        raise ValueError(f"{count} spectral coefficients asked for a row of length {length}, but basis "
                         f"{basis!r} has only {limit}{hint}; lower spectral_ratio or n_coefficients")
    return count


def draw_locations(length: int, count: int, rows: int, shared: bool, basis: str,
                   generator: torch.Generator) -> torch.Tensor:
    """Fixed frequency locations, uniformly at random without replacement.

    Returns int64 (rows, count), sorted along the last dim; with ``shared`` every row holds the same set.
    """
    limit = max_locations(length, basis)
    if shared:
        locations = torch.randperm(limit, generator=generator)[:count].sort().values
        return locations.expand(rows, count).clone()
    return torch.stack([torch.randperm(limit, generator=generator)[:count].sort().values for _ in range(rows)])


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (reference computations); everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=256)
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
    length, dtype = x.shape[-1], _working_dtype(x)
    _, forward = _dct_phases(length, x.device, dtype)
    return (torch.fft.rfft(x.to(dtype), n=2 * length, dim=-1)[..., :length] * forward).real


def idct(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct` (orthonormal DCT-III) along the last dim: one inverse real FFT of length 2L."""
    length, dtype = coefficients.shape[-1], _working_dtype(coefficients)
    inverse, _ = _dct_phases(length, coefficients.device, dtype)
    spectrum = torch.nn.functional.pad(coefficients.to(dtype) * inverse, (0, 1))
    return torch.fft.irfft(spectrum, n=2 * length, dim=-1)[..., :length]


@functools.lru_cache(maxsize=256)
def _dft_norm(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-frequency factor that makes the cosine basis vector at u unit-norm under irfft/rfft."""
    norm = torch.full((length // 2 + 1,), math.sqrt(length / 2.0), dtype=torch.float64)  # exact for float64 callers
    norm[0] = math.sqrt(length)
    if length % 2 == 0:
        norm[-1] = math.sqrt(length)
    return norm.to(device, dtype)


def decode(coefficients: torch.Tensor, locations: torch.Tensor, length: int, basis: str) -> torch.Tensor:
    """Dense rows from sparse spectra.

    coefficients: (rows, K) float; locations: (rows, K) integer -> (rows, length) float32 (float64 if given).
    """
    rows, dtype, locations = coefficients.shape[0], _working_dtype(coefficients), locations.long()
    coefficients = coefficients.to(dtype)
    if basis == "dct":
        inverse, _ = _dct_phases(length, coefficients.device, dtype)
        spectrum = torch.zeros(rows, length + 1, dtype=inverse.dtype, device=coefficients.device)
        spectrum = spectrum.scatter(1, locations, coefficients * inverse[locations])
        return torch.fft.irfft(spectrum, n=2 * length, dim=-1)[:, :length]
    norm = _dft_norm(length, coefficients.device, dtype)
    spectrum = coefficients.new_zeros(rows, length // 2 + 1).scatter(1, locations, coefficients * norm[locations])
    return torch.fft.irfft(spectrum, n=length, dim=-1)


def fit(rows: torch.Tensor, locations: torch.Tensor, basis: str) -> torch.Tensor:
    """Least-squares coefficients whose `decode` is closest to ``rows`` (exact projection: the basis is orthonormal).

    rows: (R, length) -> (R, K) float32.
    """
    length, dtype, locations = rows.shape[-1], _working_dtype(rows), locations.long()
    if basis == "dct":
        _, forward = _dct_phases(length, rows.device, dtype)
        spectrum = torch.fft.rfft(rows.to(dtype), n=2 * length, dim=-1)
        return (spectrum.gather(1, locations) * forward[locations]).real
    norm = _dft_norm(length, rows.device, dtype)
    real_spectrum = torch.fft.rfft(rows.to(dtype), dim=-1).real
    return real_spectrum.gather(1, locations) / norm[locations]


class SpectralDecode(torch.autograd.Function):
    """decode() with a one-transform backward: decode is linear with orthonormal basis vectors, so its
    adjoint is exactly `fit` (autograd through scatter + FFT + twiddles would launch about twice the kernels).

    Decoded factors are deliberately not cached across calls: DeepSpeed writes parameters through ``.data``,
    which no version counter sees, so a cache could silently serve stale factors."""

    @staticmethod
    def forward(ctx, coefficients, locations, length, basis):
        ctx.save_for_backward(locations)
        ctx.basis = basis
        return decode(coefficients.detach(), locations, length, basis)

    @staticmethod
    def backward(ctx, grad):
        (locations,) = ctx.saved_tensors
        return fit(grad, locations, ctx.basis), None, None, None


# ----- decoded-factor cache ---------------------------------------------------------------------------------
# Decoded factors change only when coefficients change: at an optimizer step or when selora writes them.
# With the cache on, a factor is decoded once per step and reused by every micro-batch and by activation-
# checkpoint recomputation. Every torch optimizer step (DeepSpeed steps one underneath) bumps the generation;
# DeepSpeed's later copy of master weights into .data happens before the next forward fills the cache.
class _DecodeCache:
    enabled = False
    generation = 0


def _bump_generation(*_args, **_kwargs) -> None:
    _DecodeCache.generation += 1


register_optimizer_step_post_hook(_bump_generation)


def cache_decoded_factors(enabled: bool = True) -> None:
    """Turn the decoded-factor cache on or off (off by default). While on, coefficients edited by hand outside
    an optimizer step or selora's own functions are seen only after the next step or the next call of this."""
    _DecodeCache.enabled = enabled
    _bump_generation()


def invalidate_decoded_factors() -> None:
    """Called by selora whenever it writes coefficients itself (re-init, load)."""
    _bump_generation()


def coefficients_state(coefficients: torch.Tensor) -> tuple:
    """What decoded rows depend on: the optimizer-step generation and the coefficients' storage and version.
    Rows decoded under an equal state are current (the cache and the model-wide batched decode both use it)."""
    return (_DecodeCache.generation, coefficients.data_ptr(), coefficients._version)


def cache_key(coefficients: torch.Tensor) -> tuple | None:
    if not _DecodeCache.enabled:
        return None
    return (*coefficients_state(coefficients), coefficients.dtype)


class CachedSpectralDecode(torch.autograd.Function):
    """Like SpectralDecode, but the forward result is ``dense``, decoded earlier (once per cache key); the
    output is a view of it (no copy), and the backward fits the incoming gradient in float32."""

    @staticmethod
    def forward(ctx, coefficients, locations, length, basis, dense):
        ctx.save_for_backward(locations)
        ctx.basis = basis
        return dense.view_as(dense)

    @staticmethod
    def backward(ctx, grad):
        (locations,) = ctx.saved_tensors
        return fit(grad, locations, ctx.basis), None, None, None, None
