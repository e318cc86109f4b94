"""The adapter layer: wraps a frozen base linear (nn.Linear, bnb Linear4bit or Linear8bitLt) and adds
``scaling * B @ A``.

A factor (selora/factors.py, made by the adapter method's config) is a small module whose ``forward()`` returns its
dense rows. Row i of A (r, in) and row i of B^T (r, out) make LoRA pair i. Everything else — rsLoRA scaling, DoRA's
magnitude, PiSSA init, SRLoRA recomposition — is written once against that interface, so every combination works.

Changes selora writes into the frozen base (PiSSA residual, SRLoRA fusion) are recorded exactly as a
low-rank product ``base_delta_B @ base_delta_A`` relative to the original base, so an adapter can be
re-applied to, and exported against, the untouched pretrained model.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .config import LoRAConfig
from .distributed import (add_low_rank, full_value, gather_to_owner, gathered, reset_optimizer_rows, set_full_value,
                          world)
from .factors import DenseFactor, SpectralFactor
from .svd import PrincipalDirections


class PairGradients:
    """The gradients of one adapter layer's decoded factors (A's rows, B^T's rows), summed since SRLoRA last read
    and cleared them (None: none arrived). A plain object rather than module attributes: SRLoRA writes 448 of
    these per step at 7B scale, and each nn.Module attribute write costs microseconds of host time."""

    __slots__ = ("A", "Bt")

    def __init__(self):
        self.A: torch.Tensor | None = None
        self.Bt: torch.Tensor | None = None

    def clear(self) -> None:
        self.A = self.Bt = None


class AdapterLinear(nn.Module):
    """``y = base(x) + scaling * B(A(dropout(x)))``, optionally DoRA-normalised.

    Shapes: x (..., in) -> y (..., out); A is (r, in), B is (out, r). The adapter computes in x's dtype,
    whatever the base stores (fp32, bf16, 4-bit, 8-bit).
    """

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, generator: torch.Generator,
                 index_sets: dict | None = None):
        super().__init__()
        self.kind = quant.base_kind(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling, self.use_dora = config.r, config.scaling, config.use_dora
        if self.r > min(self.in_features, self.out_features):
            raise ValueError(f"r={self.r} exceeds min(in={self.in_features}, out={self.out_features}) of this layer")
        device = base_layer.weight.device
        adapter_device = torch.device("meta") if device.type == "meta" else device
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = config.make_factor(self.in_features, False, generator, adapter_device, index_sets)
        self.lora_B = config.make_factor(self.out_features, True, generator, adapter_device, index_sets)
        self.magnitude = nn.Parameter(torch.ones(self.out_features, device=adapter_device)) if self.use_dora else None
        # Low-rank records relative to the pretrained base W0, in (out, k) @ (k, in) form:
        #   base_delta: written into the base weight (PiSSA residual, SRLoRA fusion on float bases)
        #   residual:   kept beside a quantized base and added in forward (no re-quantization error)
        # Not persistent: they travel only in selora's adapter files, never in a model/engine state_dict, so an
        # engine checkpoint can never restore a record without the matching base (or the reverse).
        # base_delta_chunks keeps the width of each change, so a load replays them with identical rounding.
        for name, shape in (("base_delta_A", (0, self.in_features)), ("base_delta_B", (self.out_features, 0)),
                            ("residual_A", (0, self.in_features)), ("residual_B", (self.out_features, 0))):
            self.register_buffer(name, torch.zeros(*shape, device=adapter_device), persistent=False)
        self.register_buffer("base_delta_chunks", torch.zeros(0, dtype=torch.long), persistent=False)
        self.merged = False
        self._merge_norm: torch.Tensor | None = None
        self._track_pairs = False
        self._pair_hooks: list = []  # handles of the hooks on dense factors' parameters
        self._hooked_rows: dict[str, weakref.ref] = {}  # the decoded rows a hook was last put on, per factor
        self.pair_grads = PairGradients()
        self._residual_cache: tuple | None = None  # (residual tensors, their versions and dtype, the pair made)

    # ----- factors -------------------------------------------------------------------------------------
    def factor_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (A (r, in), B (out, r)) in float32 (gathered under ZeRO-3; every rank must call)."""
        with gathered(list(self.lora_A.parameters()) + list(self.lora_B.parameters())):
            return self.lora_A().float().clone(), self.lora_B().float().T.clone()

    def pair_rows(self) -> torch.Tensor:
        """(r, in + out) float32: pair i's row of A beside its row of B^T (gathered under ZeRO-3; every rank must
        call). What SRLoRA scores against the gradients."""
        with gathered(list(self.lora_A.parameters()) + list(self.lora_B.parameters())):
            return torch.cat([self.lora_A().detach().float(), self.lora_B().detach().float()], dim=1)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in) float32."""
        A, B = self.factor_matrices()
        return self.scaling * (B @ A)

    def base_delta(self) -> torch.Tensor:
        return self.base_delta_B.float() @ self.base_delta_A.float()

    def residual(self) -> torch.Tensor:
        return self.residual_B.float() @ self.residual_A.float()

    def base_weight(self) -> torch.Tensor:
        """The weight the base computes with, dense float32 (out, in), forward-side residual included."""
        with gathered([self.base_layer.weight]):
            weight = quant.dense_weight(self.base_layer).clone()
        return weight + self.residual() if self.residual_A.shape[0] else weight

    def pretrained_weight(self) -> torch.Tensor:
        """W0: the base weight before selora changed it (up to the base's quantization error)."""
        weight = self.base_weight() - self.residual() if self.residual_A.shape[0] else self.base_weight()
        return weight - self.base_delta() if self.base_delta_A.shape[0] else weight

    def pretrained_weight_on(self, owner: int) -> torch.Tensor | None:
        """W0 on rank ``owner`` only (None elsewhere); under ZeRO-3 the base is gathered to the owner alone.
        Every rank must call it (collective)."""
        if self.kind != "linear":  # quantized bases are never ZeRO-3 partitioned here
            return self.pretrained_weight() if world()[0] == owner else None
        full = gather_to_owner(self.base_layer.weight, owner)
        if full is None:
            return None
        weight = full.float().clone()
        return weight - self.base_delta() if self.base_delta_A.shape[0] else weight

    def effective_weight(self) -> torch.Tensor:
        """What the layer computes as one dense matrix (before DoRA's per-row rescale)."""
        return self.base_weight() + (0 if self.merged else self.delta_weight())

    # ----- forward -------------------------------------------------------------------------------------
    @property
    def track_pair_gradients(self) -> bool:
        """SRLoRA sets this: the gradients of the decoded factors (A's rows, B^T's rows) are summed into
        ``pair_grads`` during the normal backward, over micro-batches, until SRLoRA reads and clears them.

        A dense factor's rows are its parameter: one hook on the parameter, put on here, sees every backward's
        gradient (before any engine accumulates, clips or partitions it). A spectral factor's rows are decoded per
        forward, so each forward's rows get a hook (`_track`); per call that costs host time, which at the 1B
        scale shows in the step time."""
        return self._track_pairs

    @track_pair_gradients.setter
    def track_pair_gradients(self, on: bool) -> None:
        for handle in self._pair_hooks:
            handle.remove()
        self._pair_hooks, self._hooked_rows, self._track_pairs = [], {}, bool(on)
        if on:
            for factor, add in ((self.lora_A, self._add_grad_A), (self.lora_B, self._add_grad_Bt)):
                if isinstance(factor, DenseFactor):
                    self._pair_hooks.append(factor.weight.register_hook(add))

    # The hook keeps the gradient tensor itself: no copy, no kernel (224 of them per step at the 1.3B shape, 448 at
    # 7B, cost more host time than the rest of SRLoRA). Holding a reference is what makes that safe: autograd hands
    # a gradient on as a parameter's .grad, or sums into it in place, only when nothing else refers to it (else it
    # copies). A second gradient (more micro-batches, or a replay) starts a new float32 sum: the held ones are
    # never written to.
    def _add_grad_A(self, grad: torch.Tensor) -> None:
        held = self.pair_grads
        held.A = grad if held.A is None else held.A.float() + grad

    def _add_grad_Bt(self, grad: torch.Tensor) -> None:
        held = self.pair_grads
        held.Bt = grad if held.Bt is None else held.Bt.float() + grad

    def _track(self, A: torch.Tensor, Bt: torch.Tensor) -> None:
        """Hooks on this call's decoded rows of spectral factors. Rows the model's decoder handed out are hooked
        once per top-level forward: a checkpoint recomputation replays the same rows, and a hook on the replay's
        tensors would never fire (backward runs through the original forward's graph)."""
        if not (self._track_pairs and torch.is_grad_enabled()):
            return
        for side, factor, rows, add in (("A", self.lora_A, A, self._add_grad_A),
                                        ("B", self.lora_B, Bt, self._add_grad_Bt)):
            if isinstance(factor, DenseFactor) or not rows.requires_grad:
                continue
            decoded = factor.decoded
            if decoded is not None:
                hooked = self._hooked_rows.get(side)
                if hooked is not None and hooked() is decoded:
                    continue
                self._hooked_rows[side] = weakref.ref(decoded)
            rows.register_hook(add)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = quant.base_output(self.base_layer, x)
        if self.merged:  # merge() wrote the adapter and any residual into the base
            return result
        A_rows, Bt_rows = self.lora_A(x.dtype), self.lora_B(x.dtype)
        self._track(A_rows, Bt_rows)
        A, B = A_rows.to(x.dtype), Bt_rows.to(x.dtype).T
        dropped = self.dropout(x)
        if self.residual_A.shape[0]:
            # The residual (exact fusions beside a quantized base) rides in the adapter's own matmuls, as k more
            # pairs: a skinny (tokens, r + k) product instead of one more full-size (tokens, out) output and sum.
            # Without dropout both sides see x, so A and the residual's rows make one matrix.
            residual_A, residual_B = self._residual_in(x.dtype)
            if dropped is x:
                hidden = F.linear(x, torch.cat([A, residual_A]))
            else:
                hidden = torch.cat([F.linear(dropped, A), F.linear(x, residual_A)], dim=-1)
            columns = torch.cat([B, residual_B], dim=1)
        else:
            hidden, columns = F.linear(dropped, A), B
        update = F.linear(hidden, columns) * self.scaling
        if not self.use_dora:
            return result + update
        bias = self.base_layer.bias
        base_out = result - bias.to(x.dtype) if bias is not None else result
        # DoRA: m * (W + dW) / ||W + dW||_row; the norm is detached as the DoRA paper recommends (memory).
        scale = (self.magnitude / self.dora_row_norms(A, B)).to(x.dtype)
        out = scale * (base_out + update)
        return out + bias.to(x.dtype) if bias is not None else out

    @torch.no_grad()
    def dora_row_norms(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Row norms of what the layer computes, W + residual + scaling B A, float32 (out,), without forming that
        (out, in) sum: with the low-rank part written L R (L = [scaling B, residual_B], R = [A; residual_A]),
        ||w_i + l_i R||^2 = ||w_i||^2 + 2 (W R^T)_i . l_i + l_i (R R^T) l_i^T. The base is read twice (one skinny
        product, one squared norm) instead of being copied, added to a dense product and normed: DoRA's forward
        costs about half the memory traffic PEFT's takes (which forms the sum)."""
        left, right = self.scaling * B.float(), A.float()
        if self.residual_A.shape[0]:
            left = torch.cat([left, self.residual_B.float()], dim=1)
            right = torch.cat([right, self.residual_A.float()], dim=0)
        with gathered([self.base_layer.weight]):
            weight = quant.dense_weight(self.base_layer)
            cross = weight @ right.T  # (out, k)
            squares = torch.linalg.vector_norm(weight, dim=1).square()
        total = squares + 2.0 * (cross * left).sum(1) + ((left @ (right @ right.T)) * left).sum(1)
        return total.clamp_min(0.0).sqrt()

    def _residual_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual's (k, in) rows and (out, k) columns in the compute dtype, the columns divided by
        ``scaling`` (forward multiplies the adapter's and the residual's sum by it once). Made once per change
        of the residual, not per call: on a 4-bit base, casting them in every forward cost SRLoRA 2 launches per
        layer and call."""
        sources = (self.residual_A, self.residual_B)
        stamp = (self.residual_A._version, self.residual_B._version, dtype, self.scaling)
        cached = self._residual_cache
        if cached is not None and cached[0][0] is sources[0] and cached[0][1] is sources[1] and cached[1] == stamp:
            return cached[2]
        pair = (self.residual_A.to(dtype), (self.residual_B / self.scaling).to(dtype))
        if not torch.is_inference_mode_enabled():  # an inference tensor could not be saved for a later backward
            self._residual_cache = (sources, stamp, pair)
        return pair

    # ----- merge ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Write the adapter (and a forward-side residual) into the base weight; forward then uses the base only."""
        if self.merged:
            return
        combined_delta = self.delta_weight()
        with gathered([self.base_layer.weight], modifier_rank=0):
            weight = quant.dense_weight(self.base_layer) + (self.residual() if self.residual_A.shape[0] else 0)
            combined = weight + combined_delta
            if self.use_dora:
                self._merge_norm = combined.norm(dim=1)
                combined = (self.magnitude.float() / self._merge_norm).unsqueeze(1) * combined
            quant.write_dense_weight(self.base_layer, combined)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to rounding for float bases; re-quantizes again for 4/8-bit bases)."""
        if not self.merged:
            return
        delta = self.delta_weight()
        with gathered([self.base_layer.weight], modifier_rank=0):
            weight = quant.dense_weight(self.base_layer)
            if self.use_dora:
                weight = (self._merge_norm / self.magnitude.float()).unsqueeze(1) * weight
            weight = weight - delta - (self.residual() if self.residual_A.shape[0] else 0)
            quant.write_dense_weight(self.base_layer, weight)
        self.merged = False

    # ----- base changes (PiSSA init, SRLoRA fusion) ------------------------------------------------------
    @torch.no_grad()
    def record_base_change(self, delta_B: torch.Tensor, delta_A: torch.Tensor, into: str = "base") -> None:
        """Add ``delta_B @ delta_A`` ((out, k) @ (k, in)) to the base weight (into="base") or keep it as a
        forward-side residual (into="residual"), and record it."""
        delta_A, delta_B = delta_A.float(), delta_B.float()
        if into == "residual":
            self.residual_A = torch.cat([self.residual_A, delta_A.to(self.residual_A)], dim=0)
            self.residual_B = torch.cat([self.residual_B, delta_B.to(self.residual_B)], dim=1)
            return
        self.base_delta_A = torch.cat([self.base_delta_A, delta_A.to(self.base_delta_A)], dim=0)
        self.base_delta_B = torch.cat([self.base_delta_B, delta_B.to(self.base_delta_B)], dim=1)
        self.base_delta_chunks = torch.cat([self.base_delta_chunks, torch.tensor([delta_A.shape[0]])])
        if self.kind == "linear":
            add_low_rank(self.base_layer.weight, delta_B.to(self.base_layer.weight.device),
                         delta_A.to(self.base_layer.weight.device))
        else:
            quant.write_dense_weight(self.base_layer, quant.dense_weight(self.base_layer) + delta_B @ delta_A)

    @torch.no_grad()
    def replace_pairs(self, pairs: torch.Tensor, directions: PrincipalDirections, into: str = "base",
                      optimizer=None) -> None:
        """Fuse pairs ``pairs`` into the base and re-initialise them along ``directions`` (one per pair), so
        that the layer computes exactly the same function before and after (up to rounding / quantization).

        Target for new pair j: A row sqrt(S_j / scaling) V_j, B column sqrt(S_j / scaling) U_j (PiSSA-style),
        the other rows as they are. Each factor is then re-fitted to its target as a whole (a dense factor takes
        it exactly; a spectral one by least squares, which moves every row whose basis functions the replaced
        rows share), and the base absorbs exactly the old product minus the new one, over the rows that changed:
        W_base += scaling * (B_old A_old - B_new A_new).
        Optimizer moments of every parameter row (dense) or entry (spectral) whose value changed are zeroed:
        they were estimated for a value the parameter no longer has; the rest keep theirs.
        """
        pairs = pairs.to(torch.long).cpu()
        values_A, values_Bt = full_value(self.lora_A.param), full_value(self.lora_B.param)
        old_A, old_Bt = self.lora_A.decode_value(values_A), self.lora_B.decode_value(values_Bt)
        root = (directions.S.float() / self.scaling).sqrt().unsqueeze(1).to(old_A.device)
        target_A, target_Bt = old_A.clone(), old_Bt.clone()
        target_A[pairs] = root * directions.V.float().T.to(old_A.device)
        target_Bt[pairs] = root * directions.U.float().T.to(old_A.device)
        new_values_A = self.lora_A.fit_value(target_A, start=values_A)
        new_values_Bt = self.lora_B.fit_value(target_Bt, start=values_Bt)
        new_A, new_Bt = self.lora_A.decode_value(new_values_A), self.lora_B.decode_value(new_values_Bt)
        # Rows where neither factor changed cancel exactly in old - new: leave them out of the record.
        changed = ((old_A != new_A).any(1) | (old_Bt != new_Bt).any(1)).nonzero().squeeze(1)
        self.record_base_change(self.scaling * torch.cat([old_Bt[changed], -new_Bt[changed]]).T,
                                torch.cat([old_A[changed], new_A[changed]]), into)
        set_full_value(self.lora_A.param, new_values_A)
        set_full_value(self.lora_B.param, new_values_Bt)
        for param, old, new in ((self.lora_A.param, values_A, new_values_A), (self.lora_B.param, values_Bt, new_values_Bt)):
            moved = (old != new).reshape(old.shape[0], -1).any(1).nonzero().squeeze(1).cpu()
            reset_optimizer_rows(optimizer, param, moved)

    @torch.no_grad()
    def initialize_from_principal_directions(self, directions: PrincipalDirections) -> None:
        """PiSSA init: all r pairs from the top-r directions; base <- base - adapter, so outputs are unchanged."""
        self.replace_pairs(torch.arange(self.r), directions)

    @torch.no_grad()
    def initialize_magnitude(self) -> None:
        """DoRA: magnitude = row norms of the current effective weight (so the output is unchanged)."""
        if self.magnitude is not None:
            set_full_value(self.magnitude, self.effective_weight().norm(dim=1))

    def extra_repr(self) -> str:
        kind = "SeLoRA" if isinstance(self.lora_A, SpectralFactor) else "LoRA"
        return (f"{kind}(in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
                f"base={self.kind}, dora={self.use_dora})")
