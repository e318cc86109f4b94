"""The SeLoRA bases, by name: the one place that lists them.

Adding a basis: write its module (a `Basis` subclass: the transform and its adjoint) and add one entry here;
config validation, the recipe schema and the docs' tables ask this registry.

- haar, db4, bior2.2, coif1: single-level periodized inverse 2-D DWT (the paper's SeLoRA_W; haar is the default)
- fft2: real part of the inverse 2-D FFT (the paper's SeLoRA_F)
- dct_rows, dft_rows: this project's own row-by-row 1-D variants (selora's bases before 0.2)
"""
from __future__ import annotations

from .basis import Basis
from . import dct_rows, wavelet
from .dct_rows import DCTRows, DFTRows
from .fourier import Fourier2D
from .wavelet import Wavelet

BASES: dict[str, Basis] = {
    "haar": Wavelet("haar"),
    "db4": Wavelet("db4"),
    "bior2.2": Wavelet("bior2.2"),
    "coif1": Wavelet("coif1"),
    "fft2": Fourier2D(),
    "dct_rows": DCTRows(),
    "dft_rows": DFTRows(),
}
DEFAULT = "haar"
# Names adapters saved by selora < 0.2 carry: the same row-wise bases under their old names.
ALIASES = {"dct": "dct_rows", "dft": "dft_rows"}


def names() -> tuple[str, ...]:
    return tuple(BASES)


def canonical(name: str) -> str:
    """The registry name for ``name`` (old aliases resolved); KeyError with the choices if unknown."""
    name = ALIASES.get(name, name)
    if name not in BASES:
        raise KeyError(f"basis={name!r}: choose one of {names()}")
    return name


def get(name: str) -> Basis:
    return BASES[canonical(name)]


# The bases keep small constant tensors per (size, device, dtype) so a forward does not rebuild them. Each module
# owns its caches (its CACHES: lru_caches of at most basis.CACHE_SIZE entries each); `clear_caches` frees them all
# (e.g. after moving a model off a GPU, or in a notebook between models). Results do not depend on what is cached.
CACHES = dct_rows.CACHES + wavelet.CACHES


def clear_caches() -> None:
    """Drop every cached basis tensor (on every device); the next decode rebuilds the ones it needs."""
    for cache in CACHES:
        cache.cache_clear()


__all__ = ["ALIASES", "BASES", "Basis", "CACHES", "DEFAULT", "canonical", "clear_caches", "get",
           "names"]
