"""The one way SeLoRA factors are decoded in a forward, owned by the model's adapters (no process-wide state).

Decoding factor by factor costs a handful of small kernels each, forward and backward; a LLaMA-7B has 448
factors, and the host time of those launches shows in the step time. So a forward pre-hook on the model
(`ModelDecoder`) stacks the entries of all factors that share a shape and basis, decodes them in one batched
transform, and hands each factor its slice. In backward one batched adjoint turns the slices' gradients into
every factor's entry gradient.

Rows handed out this way are valid only inside the top-level forward call that decoded them: a post-hook (which
runs even when the forward raises) takes them back. Everything else — a submodule called directly, DoRA norms,
merge, export — finds no rows and the factor decodes itself, through the same autograd Function. Activation-
checkpoint recomputation runs in backward, after the top-level forward returned: with the ``context_fn`` that
`selora.enable_gradient_checkpointing` installs (`ModelDecoder.checkpoint_contexts`), it gets back exactly the
rows the original forward used; with plain checkpointing it finds none and each factor decodes itself again.
Nothing is keyed on storage pointers or tensor versions, so no edit, optimizer step or second backward can meet
stale rows. Under ZeRO-3 the entries are partitioned outside each factor's own forward, so the pre-hook stands
aside and DeepSpeed gathers each factor when it is called.
"""
from __future__ import annotations

import contextlib
import hashlib
import zlib

import torch

from .bases import Basis, get
from .distributed import is_partitioned


class IndexSet:
    """The shared index set of one factor shape: sorted flat positions in the (rows, n) spectral matrix.

    Held on the CPU, with one copy per device where decoding runs (not a module buffer, so the many factors that
    share it never hold copies of their own)."""

    def __init__(self, basis: str, rows: int, length: int, indices: torch.Tensor):
        self.basis, self.rows, self.length = basis, rows, length
        self.indices = indices.to(torch.int64).cpu()
        self._on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def draw(cls, basis: str, rows: int, length: int, count: int, seed: int, shared_rows: bool = True) -> "IndexSet":
        """Drawn from ``seed`` and the shape alone, so every factor of this shape, in every process, gets the same."""
        key = f"{basis}:{rows}x{length}:{count}:{int(shared_rows)}".encode()
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key)) % (2**63))
        return cls(basis, rows, length, get(basis).draw_indices(rows, length, count, generator, shared_rows))

    def on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.indices
        if device not in self._on:
            self._on[device] = self.indices.to(device)
        return self._on[device]

    @property
    def count(self) -> int:
        return self.indices.numel()

    def mask(self) -> torch.Tensor:
        """The index set as a packed bit mask over the spectral matrix (uint8, 1/8 byte per position): how
        adapter files store it, once per shape."""
        rows, n = get(self.basis).spectral_shape(self.rows, self.length)
        bits = torch.zeros(rows * n, dtype=torch.bool)
        bits[self.indices] = True
        bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8).to(torch.uint8)
        return (bits << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1, dtype=torch.uint8)

    @classmethod
    def from_mask(cls, basis: str, rows: int, length: int, mask: torch.Tensor) -> "IndexSet":
        spectral_rows, n = get(basis).spectral_shape(rows, length)
        bits = (mask.to(torch.uint8).unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
        return cls(basis, rows, length, bits.reshape(-1)[:spectral_rows * n].nonzero().squeeze(1))

    def digest(self) -> str:
        return hashlib.sha256(self.indices.to(torch.int32).numpy().tobytes()).hexdigest()[:16]


class SpectralDecode(torch.autograd.Function):
    """(..., count) entries -> (..., rows, length) float32 factors; backward is the basis' adjoint (one
    transform, instead of autograd through scatter and transform, about twice the kernels).

    The indices are a constant of the model, kept on ctx rather than saved for backward: activation checkpointing
    (non-reentrant) requires a recomputation to save exactly the tensors the first forward saved, and under plain
    checkpointing a factor decodes itself in the recomputation while the first forward used rows decoded before
    the checkpointed block."""

    @staticmethod
    def forward(ctx, entries, indices, basis: Basis, rows: int, length: int):
        ctx.indices, ctx.basis, ctx.dtype = indices, basis, entries.dtype
        return basis.decode(entries.detach(), indices, rows, length)

    @staticmethod
    def backward(ctx, grad):
        return ctx.basis.adjoint(grad, ctx.indices).to(ctx.dtype), None, None, None, None


def hand_out(factor, rows: torch.Tensor | None) -> None:
    """Set ``factor.decoded``. It is a plain attribute (no parameter, buffer or submodule), so this is what
    nn.Module.__setattr__ ends up doing, without its bookkeeping: it runs for every factor at every checkpoint
    recomputation (448 factors x 32 blocks per step at LLaMA-7B)."""
    object.__setattr__(factor, "decoded", rows)


class ReplayedRows:
    """Puts the rows of one top-level forward back on their factors for a checkpoint recomputation, and restores
    whatever the factors held before on exit (also when the recomputation stops early by raising).

    Re-enterable: torch keeps one recompute context per checkpoint and enters it again on a second backward
    through the same graph (retain_graph)."""

    def __init__(self, rows: tuple):
        self.rows = rows  # ((factor, rows), ...)
        self.previous: list[list] = []

    def __enter__(self) -> None:
        self.previous.append([factor.decoded for factor, _ in self.rows])
        for factor, rows in self.rows:
            hand_out(factor, rows)

    def __exit__(self, *exc) -> bool:
        for (factor, _), rows in zip(self.rows, self.previous.pop()):
            hand_out(factor, rows)
        return False


class ModelDecoder:
    """Owned by a model after `selora.apply` (``model.selora_decoder``): its forward pre-hook decodes every
    factor in one transform per (shape, basis) group; its post-hook takes the rows back.

    ``batched = False`` makes every factor decode itself (the reference the tests compare against)."""

    def __init__(self, factors: list):
        self.factors = factors
        self.batched = True
        self.depth = 0  # a top-level forward called from inside itself keeps the outer call's rows
        self.merged = False  # selora.merge wrote every adapter into its base: no layer asks for rows
        self.handed_out: tuple = ()  # ((factor, rows), ...) of the running top-level forward
        self.hooks: list = []  # the handles of the hooks `attach` registered, for `detach`

    def groups(self) -> dict[tuple, list]:
        groups: dict[tuple, list] = {}
        for factor in self.factors:
            entries = factor.coefficients
            key = (factor.basis_name, factor.rows, factor.length, entries.device, entries.dtype, factor.compute_dtype)
            groups.setdefault(key, []).append(factor)
        return groups

    def before_forward(self, module, args, kwargs=None) -> None:
        self.depth += 1
        if self.depth > 1 or not self.batched or self.merged or not self.factors:
            return
        if any(is_partitioned(f.coefficients) for f in self.factors):
            return
        handed_out = []
        for (_, rows, length, device, _, compute_dtype), group in self.groups().items():
            entries = torch.stack([f.coefficients for f in group]) if len(group) > 1 else group[0].coefficients
            index_sets = {id(f.index_set): f.index_set for f in group}
            if len(index_sets) == 1:
                indices = group[0].index_set.on(device)
            else:  # factors loaded with index sets of their own (adapters saved by selora < 0.2)
                indices = torch.stack([f.index_set.on(device) for f in group])
            dense = SpectralDecode.apply(entries, indices, group[0].basis, rows, length)
            if compute_dtype is not None:  # cast once for the group (the float32 rows are then freed)
                dense = dense.to(compute_dtype)
            handed_out += zip(group, [dense] if len(group) == 1 else dense.unbind(0))
        for factor, rows_of_factor in handed_out:
            hand_out(factor, rows_of_factor)
        self.handed_out = tuple(handed_out)

    def after_forward(self, module, args, *rest) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            for factor in self.factors:
                hand_out(factor, None)
            self.handed_out = ()

    def checkpoint_contexts(self) -> tuple:
        """``context_fn`` for torch.utils.checkpoint.checkpoint (use_reentrant=False): (forward context,
        recomputation context). torch calls it at each checkpoint() call, inside the top-level forward; the
        recomputation context then re-installs the rows handed out at that moment, so the recomputed block uses
        exactly the rows of its original forward, with no per-factor decode. Exact by construction: the rows are
        the forward's own tensors, whatever happens to the entries before backward (an in-place edit, a step).

        Memory: the forward's rows of every factor (compute dtype, r x (in + out) per adapted layer) would be
        freed when the forward returns, since checkpointed blocks keep no saved tensors; each checkpoint now holds
        them until backward frees it, i.e. until the backward of the first checkpointed block.

        Nothing to replay when no rows were handed out (batched = False, ZeRO-3 partitioned entries, a call
        outside the top-level forward): the factors then decode themselves in the recomputation."""
        if not self.handed_out:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return contextlib.nullcontext(), ReplayedRows(self.handed_out)

    def attach(self, model: torch.nn.Module) -> None:
        model.selora_decoder = self
        self.hooks = [model.register_forward_pre_hook(self.before_forward),
                      model.register_forward_hook(self.after_forward, always_call=True)]

    def detach(self, model: torch.nn.Module) -> None:
        """Remove this decoder's hooks from ``model``: every factor then decodes itself (same results)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        for factor in self.factors:
            hand_out(factor, None)
        if getattr(model, "selora_decoder", None) is self:
            del model.selora_decoder
