"""Decode every SeLoRA factor of a model in one transform per factor length, once per model forward.

Decoding factor by factor costs a handful of small kernels each, forward and backward, and a LLaMA-7B layer
has 14 factors: the GPU work is tiny, but the host time (about 0.3 ms per factor) is not, and it shows in the
step time. A forward pre-hook on the model instead concatenates the coefficients of all factors that share a
row length and basis, decodes them in one batched inverse transform, and hands each factor a view of its
rows. In backward the views' gradients meet in one node, and one batched fit turns them into every factor's
coefficient gradient.

Rows decoded this way are used only while they are current: keyed by the coefficients' identity and version
and by the optimizer-step generation (spectral.coefficients_state, as the cache uses), so a factor called after an optimizer step
or an edit decodes afresh. Under ZeRO-3 (coefficients partitioned, gathered per module by DeepSpeed) the hook
stands aside and factors decode themselves. Rows are handed out in the dtype each factor's last forward
computed in (bf16 under autocast), cast once per group: the float32 rows are not kept.
"""
from __future__ import annotations

import torch

from . import spectral
from .distributed import is_partitioned


class _Switch:
    enabled = True


def batch_decode_factors(enabled: bool = True) -> None:
    """Turn the model-wide batched decode on (default) or off (factors then decode one by one)."""
    _Switch.enabled = enabled


class BatchedSpectralDecode:
    """Forward pre-hook: sets ``factor.batched_rows`` / ``factor.batched_key`` on every SpectralFactor."""

    def __init__(self, factors: list):
        self.factors = factors
        self._layout: dict[tuple, tuple] = {}

    def groups(self) -> dict[tuple, list]:
        groups: dict[tuple, list] = {}
        for factor in self.factors:
            c = factor.coefficients
            key = (factor.length, factor.basis, c.device, c.dtype, c.shape[1], factor.compute_dtype)
            groups.setdefault(key, []).append(factor)
        return groups

    def locations_of(self, signature: tuple, group: list) -> torch.Tensor:
        """The group's locations as one tensor. The factors' own buffers become views into it (so the
        locations are stored once); rebuilt when a buffer was replaced (a move to another device)."""
        if len(group) == 1:
            return group[0].locations
        pointers = tuple(f.locations.data_ptr() for f in group)
        layout = self._layout.get(signature)
        if layout is None or layout[0] != pointers:
            joined = torch.cat([f.locations for f in group])
            start = 0
            for factor in group:
                rows = factor.locations.shape[0]
                factor.locations = joined[start:start + rows]  # a registered buffer: stays in state_dict
                start += rows
            layout = self._layout[signature] = (tuple(f.locations.data_ptr() for f in group), joined)
        return layout[1]

    def __call__(self, module, args) -> None:
        if not _Switch.enabled or not self.factors or any(is_partitioned(f.coefficients) for f in self.factors):
            return
        for signature, group in self.groups().items():
            length, basis, compute_dtype = signature[0], signature[1], signature[-1]
            coefficients = torch.cat([f.coefficients for f in group]) if len(group) > 1 else group[0].coefficients
            dense = spectral.SpectralDecode.apply(coefficients, self.locations_of(signature, group), length, basis)
            if compute_dtype is not None:  # cast once for the group (the float32 rows are then freed)
                dense = dense.to(compute_dtype)
            for factor, rows in zip(group, torch.split(dense, [f.coefficients.shape[0] for f in group])):
                factor.batched_rows, factor.batched_key = rows, spectral.coefficients_state(factor.coefficients)
