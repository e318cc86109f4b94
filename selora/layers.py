"""The adapter layer: wraps a frozen base linear (nn.Linear, bnb Linear4bit or Linear8bitLt) and adds
``scaling * B @ A``.

A factor is a small module whose ``forward()`` returns its dense rows. Row i of A (r, in) and row i of
B^T (r, out) make LoRA pair i. `DenseFactor` trains the rows directly (LoRA); `SpectralFactor` decodes
them from sparse spectral coefficients (SeLoRA). Everything else — rsLoRA scaling, DoRA's magnitude,
PiSSA init, SRLoRA recomposition — is written once against that interface, so every combination works.

Changes selora writes into the frozen base (PiSSA residual, SRLoRA fusion) are recorded exactly as a
low-rank product ``base_delta_B @ base_delta_A`` relative to the original base, so an adapter can be
re-applied to, and exported against, the untouched pretrained model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import quant, spectral
from .config import LoRAConfig, SeLoRAConfig
from .distributed import gathered
from .svd import PrincipalDirections


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

    def forward(self) -> torch.Tensor:
        return self.weight

    def trainable_rows(self) -> list[nn.Parameter]:
        return [self.weight]

    @torch.no_grad()
    def fit_rows(self, target: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Set rows (all, or the given indices) to the closest representable values of ``target``."""
        index = slice(None) if rows is None else rows
        self.weight.data[index] = target.to(self.weight.dtype)


class SpectralFactor(nn.Module):
    """SeLoRA factor: rows are the inverse transform of ``coefficients`` (rows, K) placed at ``locations``."""

    def __init__(self, rows: int, length: int, count: int, basis: str, shared_locations: bool, zero: bool,
                 generator: torch.Generator, device: torch.device):
        super().__init__()
        self.length, self.basis = length, basis
        self.coefficients = nn.Parameter(torch.empty(rows, count, device=device))
        locations = spectral.draw_locations(length, count, rows, shared_locations, basis, generator)
        self.register_buffer("locations", locations.to(device))
        if device.type != "meta":
            # Orthonormal bases keep norms: U(-1/sqrt(K), 1/sqrt(K)) gives each decoded row the same expected
            # norm as LoRA's kaiming-uniform row, whatever the spectral ratio.
            bound = 0.0 if zero else 1.0 / math.sqrt(count)
            values = torch.rand(rows, count, generator=generator) * 2 * bound - bound
            self.coefficients.data.copy_(values)

    def forward(self) -> torch.Tensor:
        return spectral.decode(self.coefficients, self.locations, self.length, self.basis)

    def trainable_rows(self) -> list[nn.Parameter]:
        return [self.coefficients]

    @torch.no_grad()
    def fit_rows(self, target: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Least-squares coefficients for ``target`` rows (the projection onto this row's basis vectors)."""
        locations = self.locations if rows is None else self.locations[rows]
        fitted = spectral.fit(target, locations, self.basis).to(self.coefficients.dtype)
        index = slice(None) if rows is None else rows
        self.coefficients.data[index] = fitted


def make_factor(config: LoRAConfig, length: int, zero: bool, generator: torch.Generator,
                device: torch.device) -> nn.Module:
    if isinstance(config, SeLoRAConfig):
        count = spectral.coefficient_count(length, config.spectral_ratio, config.n_coefficients, config.basis)
        return SpectralFactor(config.r, length, count, config.basis, config.shared_locations, zero, generator, device)
    return DenseFactor(config.r, length, zero, generator, device)


class AdapterLinear(nn.Module):
    """``y = base(x) + scaling * B(A(dropout(x)))``, optionally DoRA-normalised.

    Shapes: x (..., in) -> y (..., out); A is (r, in), B is (out, r). The adapter computes in x's dtype,
    whatever the base stores (fp32, bf16, 4-bit, 8-bit).
    """

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, generator: torch.Generator):
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
        self.lora_A = make_factor(config, self.in_features, zero=False, generator=generator, device=adapter_device)
        self.lora_B = make_factor(config, self.out_features, zero=True, generator=generator, device=adapter_device)
        self.magnitude = nn.Parameter(torch.ones(self.out_features, device=adapter_device)) if self.use_dora else None
        # Low-rank record of what selora wrote into the base: W_base = W_pretrained + delta_B @ delta_A.
        self.register_buffer("base_delta_A", torch.zeros(0, self.in_features, device=adapter_device))
        self.register_buffer("base_delta_B", torch.zeros(self.out_features, 0, device=adapter_device))
        # When True the delta is *not* in the base but added in forward (quantized bases, no re-quantization).
        self.delta_in_forward = False
        self.merged = False
        self._merge_norm: torch.Tensor | None = None

    # ----- factors -------------------------------------------------------------------------------------
    def factor_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (A (r, in), B (out, r)) in float32."""
        return self.lora_A().float(), self.lora_B().float().T

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in) float32."""
        A, B = self.factor_matrices()
        return self.scaling * (B @ A)

    def base_delta(self) -> torch.Tensor:
        return self.base_delta_B.float() @ self.base_delta_A.float()

    def base_weight(self) -> torch.Tensor:
        """The weight the base computes with, dense float32 (out, in), including a forward-side delta."""
        with gathered([self.base_layer.weight]):
            weight = quant.dense_weight(self.base_layer).clone()
        return weight + self.base_delta() if self.delta_in_forward else weight

    def effective_weight(self) -> torch.Tensor:
        """What the layer computes as one dense matrix (before DoRA's per-row rescale)."""
        return self.base_weight() + (0 if self.merged else self.delta_weight())

    # ----- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.delta_in_forward and self.base_delta_A.shape[0] > 0:
            result = result + F.linear(F.linear(x, self.base_delta_A.to(x.dtype)), self.base_delta_B.to(x.dtype))
        if self.merged:
            return result
        A = self.lora_A().to(x.dtype)
        B = self.lora_B().to(x.dtype).T
        update = F.linear(F.linear(self.dropout(x), A), B) * self.scaling
        if not self.use_dora:
            return result + update
        bias = self.base_layer.bias
        base_out = result - bias.to(x.dtype) if bias is not None else result
        # DoRA: m * (W + dW) / ||W + dW||_row; the norm is detached as the DoRA paper recommends (memory).
        with torch.no_grad():
            norm = (self.base_weight() + self.scaling * (B.float() @ A.float())).norm(dim=1)
        scale = (self.magnitude / norm).to(x.dtype)
        out = scale * (base_out + update)
        return out + bias.to(x.dtype) if bias is not None else out

    # ----- merge ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Write the adapter (and a forward-side delta) into the base weight; forward then uses the base only."""
        if self.merged:
            return
        with gathered([self.base_layer.weight], modifier_rank=0):
            weight = quant.dense_weight(self.base_layer)
            if self.delta_in_forward:
                weight = weight + self.base_delta()
            combined = weight + self.delta_weight()
            if self.use_dora:
                self._merge_norm = combined.norm(dim=1)
                combined = (self.magnitude.float() / self._merge_norm).unsqueeze(1) * combined
            quant.write_dense_weight(self.base_layer, combined)
        self._delta_was_in_forward, self.delta_in_forward = self.delta_in_forward, False
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to rounding for float bases; re-quantizes again for 4/8-bit bases)."""
        if not self.merged:
            return
        self.delta_in_forward = self._delta_was_in_forward
        with gathered([self.base_layer.weight], modifier_rank=0):
            weight = quant.dense_weight(self.base_layer)
            if self.use_dora:
                weight = (self._merge_norm / self.magnitude.float()).unsqueeze(1) * weight
            weight = weight - self.delta_weight()
            if self.delta_in_forward:
                weight = weight - self.base_delta()
            quant.write_dense_weight(self.base_layer, weight)
        self.merged = False

    # ----- base changes (PiSSA init, SRLoRA fusion) ------------------------------------------------------
    @torch.no_grad()
    def record_base_change(self, delta_B: torch.Tensor, delta_A: torch.Tensor) -> None:
        """Add ``delta_B @ delta_A`` (out, k) @ (k, in) to the base (or to the forward-side delta)."""
        self.base_delta_A = torch.cat([self.base_delta_A, delta_A.to(self.base_delta_A)], dim=0)
        self.base_delta_B = torch.cat([self.base_delta_B, delta_B.to(self.base_delta_B)], dim=1)
        if self.delta_in_forward:
            return
        with gathered([self.base_layer.weight], modifier_rank=0):
            weight = quant.dense_weight(self.base_layer)
            quant.write_dense_weight(self.base_layer, weight + delta_B.float() @ delta_A.float())

    @torch.no_grad()
    def set_pairs_from_directions(self, directions: PrincipalDirections, pairs: torch.Tensor) -> None:
        """PiSSA-style: pair p_j gets A row sqrt(S_j) V_j and B column sqrt(S_j) U_j, divided by sqrt(scaling)
        so that the pair's update equals S_j U_j V_j^T, then fitted to the factor's parametrisation.

        The base is NOT touched here; callers compensate with `record_base_change`.
        """
        root = (directions.S.float() / self.scaling).sqrt()
        self.lora_A.fit_rows(root.unsqueeze(1) * directions.V.float().T, pairs)
        self.lora_B.fit_rows(root.unsqueeze(1) * directions.U.float().T, pairs)

    @torch.no_grad()
    def initialize_from_principal_directions(self, directions: PrincipalDirections) -> None:
        """PiSSA init: all r pairs from the top-r directions; base <- base - adapter, so outputs are unchanged."""
        pairs = torch.arange(self.r, device=self.lora_A.trainable_rows()[0].device)
        self.set_pairs_from_directions(directions, pairs)
        A, B = self.factor_matrices()
        self.record_base_change(-self.scaling * B, A)

    @torch.no_grad()
    def initialize_magnitude(self) -> None:
        """DoRA: magnitude = row norms of the current effective weight (so the output is unchanged)."""
        if self.magnitude is not None:
            self.magnitude.data.copy_(self.effective_weight().norm(dim=1).to(self.magnitude.dtype))

    def extra_repr(self) -> str:
        kind = "SeLoRA" if isinstance(self.lora_A, SpectralFactor) else "LoRA"
        return (f"{kind}(in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
                f"base={self.kind}, dora={self.use_dora})")
