"""SRLoRA: importance-scored LoRA pairs, periodically fused into the base and re-initialised along unused
principal directions of the pretrained weight (subspace recomposition).

Per pair i of a layer (row i of A, column i of B; the *decoded* factors for SeLoRA) the sensitivity is
    I_i = mean over the pair's elements of |theta * dL/dtheta|
(the mean, not the sum, so layers of different shapes compare). As in AdaLoRA, it is smoothed and paired
with its uncertainty:  Ibar <- b1 Ibar + (1-b1) I,   Ubar <- b2 Ubar + (1-b2) |I - Ibar|,   score = Ibar * Ubar.
Gradients come from hooks on the decoded factors during the normal backward (no extra pass); they are summed
over micro-batches and, across data-parallel ranks, all-reduced before scoring, so every rank scores the
global gradient and takes the same decision.

At each scheduled step the lowest-scoring ``pairs_per_recomposition`` pairs (per layer, or over all layers
with scope="global") are replaced by `AdapterLinear.replace_pairs`: fused into the base and re-initialised
along the next unused singular directions, the base compensating so the model's function does not jump.
A re-initialised pair's scores restart from the mean of its layer's other pairs (a neutral start; zero
would make it the first candidate for the next fusion).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigValueError, SRLoRAConfig
from .distributed import all_reduce_sum, is_partitioned, world
from .inject import adapter_layers
from .layers import AdapterLinear
from .svd import sharded_principal_directions


class SRLoRA:
    """Owns the importance scores, the schedule and the used-direction record of every adapter layer."""

    def __init__(self, model: nn.Module, config: SRLoRAConfig, total_steps: int | None = None):
        self.layers: dict[str, AdapterLinear] = adapter_layers(model)
        if not self.layers:
            raise ConfigValueError("SRLoRA needs adapter layers: call selora.apply(model, config) first")
        adapter_config = model.selora_config
        self.r = adapter_config.r
        config, steps = config.checked_schedule(self.r, total_steps)
        self.config = config
        k = config.pairs_per_recomposition
        self.schedule = steps
        first_free = self.r if adapter_config.init == "pissa" else 0
        self.fusion_target = {}
        counts = {}
        for name, layer in self.layers.items():
            limit = min(layer.in_features, layer.out_features)
            need = first_free + k * len(steps)
            if need > limit:
                raise ConfigValueError(
                    f"{name}: {len(steps)} recompositions x {k} pairs need {need} principal directions but the "
                    f"{layer.out_features}x{layer.in_features} weight has only {limit}; fire less often or fuse fewer pairs")
            counts[name] = need
            quantized = layer.kind != "linear"
            self.fusion_target[name] = "residual" if quantized and config.quantized_fusion == "residual" else "base"
            if quantized and self.fusion_target[name] == "base" and is_partitioned(layer.base_layer.weight):
                raise ConfigValueError(
                    f"{name}: cannot re-quantize a {layer.kind} base that ZeRO-3 partitions across ranks; "
                    "set srlora.quantized_fusion=residual (fused updates stay beside the base, exactly)")
        for layer in self.layers.values():
            layer.track_pair_gradients = True
        self.directions, self.svd_stats = sharded_principal_directions(
            self.layers, counts, method=config.svd, seed=adapter_config.seed, oversample=config.svd_oversample)
        self.layer_list = list(self.layers.values())
        device = next(iter(self.layers.values())).base_delta_A.device
        self._score_groups: list[ScoreGroup] | None = None  # made at the first scoring, once the engine exists
        self.importance = torch.zeros(len(self.layers), self.r, device=device)
        self.uncertainty = torch.zeros(len(self.layers), self.r, device=device)
        self.used = [list(range(first_free)) for _ in self.layers]
        self.steps_done = 0
        self.history: list[dict] = []

    # ----- scores ----------------------------------------------------------------------------------------
    def scores(self) -> torch.Tensor:
        """(layers, r) smoothed importance x uncertainty; lower = fused first."""
        return self.importance * self.uncertainty

    @torch.no_grad()
    def _sensitivity(self) -> torch.Tensor:
        """(layers, r) mean |theta * grad| per pair, from the gradients summed since the last step.

        Layers of one shape are scored together: their factors and gradients are stacked, reduced across ranks and
        scored in a few tensor operations per shape, not per layer. The step is host-bound at 1B scale, where a
        LLaMA has 112-224 adapted projections in 3 shapes: what runs per layer is a list read and a clear."""
        device, world_size = self.importance.device, world()[1]
        sensitivity = torch.empty(len(self.layers), self.r, device=device)
        for group in self.score_groups():
            grads_A, grads_Bt = group.stacked_grads(device)
            if world_size > 1:
                grads_A, grads_Bt = all_reduce_sum(grads_A), all_reduce_sum(grads_Bt)
            theta_A, theta_Bt = group.stacked_factors(device)
            total = torch.linalg.vector_norm(theta_A * grads_A, ord=1, dim=2)
            total += torch.linalg.vector_norm(theta_Bt * grads_Bt, ord=1, dim=2)
            sensitivity.index_copy_(0, group.rows, total / (world_size * (group.n_in + group.n_out)))
            for held in group.pair_grads:
                held.clear()
        return sensitivity

    def score_groups(self) -> list[ScoreGroup]:
        """The same-shape layer groups, made on first use: by then the engine has partitioned what ZeRO-3
        partitions, which decides whether a group's factors can be decoded together."""
        if self._score_groups is None:
            shapes: dict[tuple[int, int], list[int]] = {}
            for index, layer in enumerate(self.layer_list):
                shapes.setdefault((layer.in_features, layer.out_features), []).append(index)
            self._score_groups = [ScoreGroup(shape, [self.layer_list[i] for i in indices],
                                             torch.tensor(indices, device=self.importance.device), self.r)
                                  for shape, indices in shapes.items()]
        return self._score_groups

    @torch.no_grad()
    def update_scores(self) -> None:
        """One EMA step of importance and uncertainty. A pair whose gradient overflowed (float16's loss scaling
        skips such a step) keeps its scores: an inf would stay in the averages for good and make every later
        ranking meaningless. Elementwise, so no step waits on the device to ask."""
        sensitivity = self._sensitivity()
        b1, b2 = self.config.ema_beta, self.config.uncertainty_beta
        finite = torch.isfinite(sensitivity)
        importance = b1 * self.importance + (1 - b1) * sensitivity
        uncertainty = b2 * self.uncertainty + (1 - b2) * (sensitivity - importance).abs()
        self.importance.copy_(torch.where(finite, importance, self.importance))
        self.uncertainty.copy_(torch.where(finite, uncertainty, self.uncertainty))

    # ----- recomposition -----------------------------------------------------------------------------------
    def choose_pairs(self) -> dict[int, torch.Tensor]:
        """Layer index -> pair indices to fuse now (ties broken by index, so every rank agrees)."""
        k = self.config.pairs_per_recomposition
        scores = self.scores()
        if self.config.scope == "layer":
            return {i: torch.argsort(scores[i], stable=True)[:k].sort().values for i in range(len(self.layers))}
        flat = torch.argsort(scores.reshape(-1), stable=True)[:k]
        chosen: dict[int, list[int]] = {}
        for index in flat.tolist():
            chosen.setdefault(index // self.r, []).append(index % self.r)
        return {i: torch.tensor(sorted(p)) for i, p in sorted(chosen.items())}

    @torch.no_grad()
    def recompose(self, step: int, optimizer=None) -> list[dict]:
        events = []
        names = list(self.layers)
        for index, pairs in self.choose_pairs().items():
            name, layer = names[index], self.layers[names[index]]
            start = len(self.used[index])
            columns = torch.arange(start, start + len(pairs))
            d = self.directions[name]
            subset = type(d)(d.U[:, columns], d.S[columns], d.V[:, columns])
            layer.replace_pairs(pairs, subset, into=self.fusion_target[name], optimizer=optimizer)
            self.used[index] += columns.tolist()
            keep = torch.ones(self.r, dtype=torch.bool)
            keep[pairs] = False
            for table in (self.importance, self.uncertainty):
                table[index, pairs] = table[index, keep].mean() if keep.any() else 0.0
            events.append({"step": step, "layer": name, "pairs": pairs.tolist(), "directions": columns.tolist()})
        self.history += events
        return events

    def step(self, step: int, optimizer=None) -> list[dict]:
        """Call once after each completed optimizer step (``step`` = steps completed). Updates the scores and,
        when the schedule says so, recomposes. Returns the recomposition events (empty list otherwise)."""
        self.update_scores()
        self.steps_done = step
        return self.recompose(step, optimizer) if step in self.schedule else []

    # ----- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Scores, used directions and schedule position, as tensors (saved with the adapter)."""
        width = max(len(u) for u in self.used) if self.used else 0
        used = torch.full((len(self.used), max(width, 1)), -1, dtype=torch.long)
        for i, u in enumerate(self.used):
            used[i, :len(u)] = torch.tensor(u, dtype=torch.long)
        return {"srlora.importance": self.importance.cpu().clone(), "srlora.uncertainty": self.uncertainty.cpu().clone(),
                "srlora.used_directions": used, "srlora.steps_done": torch.tensor(self.steps_done)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = tuple(self.importance.shape)
        if tuple(state["srlora.importance"].shape) != expected:
            raise ConfigValueError(f"SRLoRA state has scores for {tuple(state['srlora.importance'].shape)} "
                                   f"(layers, r) but this model has {expected}")
        self.importance.copy_(state["srlora.importance"])
        self.uncertainty.copy_(state["srlora.uncertainty"])
        self.used = [[int(j) for j in row if j >= 0] for row in state["srlora.used_directions"]]
        self.steps_done = int(state["srlora.steps_done"])


class ScoreGroup:
    """Adapter layers of one shape, scored together: their rows of the score tables (a device tensor: writing
    rows named by a Python list copies the list to the device and waits for it), their gradient holders, and
    whether their factors are stacked and decoded in one call (`_decode_together`) or gathered layer by layer."""

    def __init__(self, shape: tuple[int, int], members: list[AdapterLinear], rows: torch.Tensor, r: int):
        self.n_in, self.n_out = shape
        self.members, self.rows, self.r = members, rows, r
        self.pair_grads = [layer.pair_grads for layer in members]
        self.together = _decode_together(members)
        self.factors = [[getattr(layer, side) for layer in members] for side in ("lora_A", "lora_B")]

    def stacked_grads(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, r, in) and (layers, r, out) float32: the summed gradients, zeros where none arrived (every rank
        must still contribute). Stacked as they came (bf16 on a bf16 model), converted once."""
        return (self._stack([held.A for held in self.pair_grads], self.n_in, device),
                self._stack([held.Bt for held in self.pair_grads], self.n_out, device))

    def _stack(self, grads: list, length: int, device) -> torch.Tensor:
        if any(grad is None or grad.dtype != grads[0].dtype for grad in grads):
            grads = [torch.zeros(self.r, length, device=device) if grad is None else grad.to(device, torch.float32)
                     for grad in grads]
        return torch.stack(grads).to(device, torch.float32)

    def stacked_factors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, r, in) A and (layers, r, out) B^T, float32."""
        if self.together:
            return tuple(factors[0].decode_value(torch.stack([f.param.detach() for f in factors])).to(device)
                         for factors in self.factors)
        rows = torch.stack([layer.pair_rows().to(device) for layer in self.members])
        return rows[..., :self.n_in], rows[..., self.n_in:]


def _decode_together(layers: list[AdapterLinear]) -> bool:
    """Whether these layers' factors can be stacked and decoded in one call: none partitioned by ZeRO-3, and each
    side's factors of one kind (dense, or spectral with one basis and one shared index set; adapters saved by
    selora < 0.2 carry an index set per factor)."""
    for side in ("lora_A", "lora_B"):
        factors = [getattr(layer, side) for layer in layers]
        if any(is_partitioned(f.param) for f in factors):
            return False
        first = factors[0]
        if any(type(f) is not type(first) for f in factors):
            return False
        if any(getattr(f, "index_set", None) is not getattr(first, "index_set", None) or
               getattr(f, "basis_name", None) != getattr(first, "basis_name", None) for f in factors):
            return False
    return True
