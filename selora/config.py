"""Adapter configurations: plain dataclasses, validated on construction, and the registry of adapter methods.

A config describes *what* to attach; `selora.apply` decides *where*. Everything a config holds is saved with
the adapter (adapter_config.json) so a saved adapter can be re-applied without the code that trained it.

An adapter method is one config class: its ``method`` name, its fields (which become the recipe's ``adapter.*``
keys) and ``make_factor`` (the module each LoRA factor is). ``@register_method`` enters it in ``ADAPTER_METHODS``,
the one list every other place asks (recipe config schema, validation, saved adapters, checkpoints).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import bases
from .decode import IndexSet
from .factors import DenseFactor, SpectralFactor

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_CHOICES = ("default", "pissa")
INIT_SVD_CHOICES = ("full", "randomized")


class ConfigValueError(ValueError):
    """A config field holds a value the adapter cannot use; the message names the field and the fix."""


# adapter method name -> its config class; filled by @register_method, in the order methods are defined.
ADAPTER_METHODS: dict[str, type["LoRAConfig"]] = {}


def register_method(cls: type["LoRAConfig"]) -> type["LoRAConfig"]:
    """Class decorator: ``cls.method`` becomes a name configs, saved adapters and recipes accept."""
    ADAPTER_METHODS[cls.method] = cls
    return cls


def method_config(method: str) -> type["LoRAConfig"]:
    """The config class of adapter method ``method``; an unknown name is an error listing the known ones."""
    if method not in ADAPTER_METHODS:
        raise ConfigValueError(f"method={method!r}: unknown adapter method; choose one of {', '.join(ADAPTER_METHODS)}")
    return ADAPTER_METHODS[method]


@register_method
@dataclass
class LoRAConfig:
    """Plain LoRA: dW = scaling * B @ A with A (r x in), B (out x r), B = 0 at init.

    Each field is a recipe's ``adapter.*`` key; its default here is the recipes' default (no other file restates it).
    r: the rank of the update.
    alpha: the update's scale, alpha / r (alpha / sqrt(r) with use_rslora).
    dropout: dropout on the adapter's input (the recipes use 0.05).
    target_modules: module-name suffixes (``"q_proj"``) or, when an entry starts with ``"re:"``, a regular
    expression matched against the full module name (``"re:.*layers\\.[0-3]\\..*proj"``).
    use_rslora: scaling = alpha / sqrt(r) (rank-stabilised) instead of alpha / r.
    use_dora: add DoRA's trainable per-output magnitude vector.
    init: "default" (A random, B zero) or "pissa" (factors from the base weight's top-r singular directions,
    base replaced by its residual so the model's function is unchanged).
    init_svd: how PiSSA finds those directions: "full" (torch.linalg.svd of each weight: minutes for the 224
    projections of a 7B model on one GPU) or "randomized" (torch.svd_lowrank, 4 power iterations: seconds; the
    top-r directions of a pretrained weight agree closely; PEFT's "pissa_niter_4"). Either way the base keeps the
    exact residual, so the model's function is unchanged.
    seed: seeds every layer's initialisation (and SeLoRA's index sets), the same in every process.
    """

    method: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    init_svd: str = "full"
    seed: int = 0

    def __post_init__(self) -> None:
        # One name given as a string means that one module, not its letters.
        names = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        self.target_modules = tuple(names)
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigValueError(f"r={self.r!r}: the rank must be a positive integer, e.g. r=8")
        if self.alpha <= 0:
            raise ConfigValueError(f"alpha={self.alpha!r}: alpha must be > 0 (it sets the update's scale)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        if not self.target_modules:
            raise ConfigValueError("target_modules is empty: name at least one module, e.g. ('q_proj', 'v_proj')")
        if self.init not in INIT_CHOICES:
            raise ConfigValueError(f"init={self.init!r}: choose one of {INIT_CHOICES}")
        if self.init_svd not in INIT_SVD_CHOICES:
            raise ConfigValueError(f"init_svd={self.init_svd!r}: choose one of {INIT_SVD_CHOICES}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        out["method"] = self.method
        return out

    def make_factor(self, length: int, zero: bool, generator: torch.Generator, device: torch.device,
                    index_sets: dict | None = None) -> DenseFactor:
        """One factor of ``r`` rows of ``length`` (zero: LoRA's B at init); LoRA trains the rows themselves."""
        return DenseFactor(self.r, length, zero, generator, device)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "LoRAConfig":
        data = dict(data)
        cls = method_config(data.pop("method", "lora"))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**data)


@register_method
@dataclass
class SeLoRAConfig(LoRAConfig):
    """SeLoRA (arXiv 2506.16787): each LoRA factor is the inverse spectral transform of a sparse spectral matrix.

    A (r x in) and B (out x r; stored as B^T, r x out) are each decoded as a whole matrix, A = T(F_A), from a
    spectral matrix F of the factor's own shape whose only non-zero entries are ``count`` learnable ones at a
    fixed index set. The index set is drawn once per factor shape from ``seed`` and shared by every factor of
    that shape (the paper's global shared index set). count = floor(spectral_ratio * r * length) (spectral_ratio
    is the paper's 1 - eta), or ``n_coefficients * r`` when given, so the adapter has about ``spectral_ratio``
    times LoRA's parameters while the decoded factors stay dense.

    spectral_ratio: trainable entries per factor / the factor's size, in (0, 1] (0.5: half LoRA's parameters).
    basis: a name in the ``selora.bases`` registry (``selora.bases.names()``); the default "haar" is the paper's
    SeLoRA_W. Names adapters carried before selora 0.2 resolve through ``selora.bases.ALIASES``.
    n_coefficients: learnable entries per factor row (count = n_coefficients * r), instead of spectral_ratio.
    shared_locations: row-wise bases only: True -> every row uses the same K columns; False -> each row its own.
    """

    method: ClassVar[str] = "selora"

    spectral_ratio: float = 0.5
    n_coefficients: int | None = None
    basis: str = bases.DEFAULT
    shared_locations: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.spectral_ratio <= 1.0):
            raise ConfigValueError(
                f"spectral_ratio={self.spectral_ratio!r}: must be in (0, 1], the fraction of each factor's "
                "spectral entries that is trainable (0.5 halves LoRA's parameter count)")
        if self.n_coefficients is not None and (not isinstance(self.n_coefficients, int) or self.n_coefficients < 1):
            raise ConfigValueError(f"n_coefficients={self.n_coefficients!r}: must be a positive integer or None")
        try:
            self.basis = bases.canonical(self.basis)
        except KeyError as error:
            raise ConfigValueError(error.args[0]) from None
        if not self.shared_locations and not bases.get(self.basis).row_wise:
            raise ConfigValueError(
                f"shared_locations=False applies to the row-wise bases only (dct_rows, dft_rows); basis "
                f"{self.basis!r} uses one index set per factor shape: set shared_locations=True")

    def make_factor(self, length: int, zero: bool, generator: torch.Generator, device: torch.device,
                    index_sets: dict | None = None) -> SpectralFactor:
        """A spectral factor of ``r`` rows of ``length``; factors of one shape share one IndexSet from
        ``index_sets`` (keyed by basis and shape; filled on first use: the paper's global shared index set)."""
        index_sets = {} if index_sets is None else index_sets
        key = (self.basis, self.r, length)
        if key not in index_sets:
            count = bases.get(self.basis).count(self.r, length, self.spectral_ratio, self.n_coefficients)
            index_sets[key] = IndexSet.draw(self.basis, self.r, length, count, self.seed, self.shared_locations)
        return SpectralFactor(self.r, length, self.basis, index_sets[key], zero, generator, device)


@dataclass
class SRLoRAConfig:
    """SRLoRA schedule: every ``interval`` steps in [start_step, end_step], fuse the
    ``pairs_per_recomposition`` least important pairs (per layer, or globally) into the base and
    re-initialise them along unused principal directions of the pretrained weight.

    start_step: first recomposition, in optimizer steps (>= 1; scores need one step of gradients).
    end_step: last possible recomposition (steps past the run's end never come).
    interval: steps between recompositions.
    pairs_per_recomposition: pairs fused and re-initialised per layer (must be < r).
    schedule: "fixed" (the four keys above, as given) or "paper" (SRLoRA's own schedule, from a target rank: at
    each switch ``pairs_fraction`` x r pairs are re-initialised (the paper's gamma, about 0.5), the run makes
    N = (target_rank - r) / pairs switches, and they are spread evenly, every total_steps // N steps, the last one
    before the final step). With "paper", start_step, end_step, interval and pairs_per_recomposition are derived
    by `for_run` once the rank and the run's length are known.
    pairs_fraction: "paper": the share of the r pairs re-initialised per switch (gamma).
    target_rank: "paper": the rank the switches add up to (None: 3 r).
    ema_beta: smoothing of the importance score, the sensitivity |theta * grad| (AdaLoRA).
    uncertainty_beta: smoothing of the score's uncertainty, its deviation (AdaLoRA).
    scope: "layer" (the least important pairs of each layer) or "global" (of the whole model).
    svd: "full" or "randomized" (torch.svd_lowrank) for the principal directions.
    svd_oversample: randomized SVD: extra directions sampled beyond those needed.
    quantized_fusion: "residual" (default: keep fused updates as a frozen low-rank residual beside a quantized
    base; the output does not jump) or "requantize" (dequantize, add, quantize again; measured output jump on
    the test model: ~8-10% relative for nf4, see docs/srlora.md).
    warmup_steps: no recomposition before the learning-rate warm-up ends (a recipe sets it from
    train.warmup_steps).
    """

    FIXED_SCHEDULE_KEYS: ClassVar[tuple[str, ...]] = ("start_step", "end_step", "interval", "pairs_per_recomposition")

    start_step: int = 10
    end_step: int = 100
    interval: int = 10
    pairs_per_recomposition: int = 1
    schedule: str = "fixed"
    pairs_fraction: float = 0.5
    target_rank: int | None = None
    ema_beta: float = 0.85
    uncertainty_beta: float = 0.85
    scope: str = "layer"
    svd: str = "full"
    svd_oversample: int = 8
    quantized_fusion: str = "residual"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.schedule != "paper":  # "paper" derives these four in for_run (and checks the result there)
            if self.interval < 1:
                raise ConfigValueError(f"srlora.interval={self.interval}: must be >= 1 step")
            if self.start_step < 1:
                raise ConfigValueError(f"srlora.start_step={self.start_step}: must be >= 1 (scores need one step of gradients)")
            if self.end_step < self.start_step:
                raise ConfigValueError(
                    f"srlora.end_step={self.end_step} is before start_step={self.start_step}: the schedule never fires; "
                    "set end_step >= start_step")
            if self.start_step < self.warmup_steps:
                raise ConfigValueError(
                    f"srlora.start_step={self.start_step} fires before the warm-up ends (warmup_steps={self.warmup_steps}); "
                    "importance scores are not meaningful yet — start at or after warm-up")
        if self.pairs_per_recomposition < 1:
            raise ConfigValueError(f"srlora.pairs_per_recomposition={self.pairs_per_recomposition}: must be >= 1")
        for name in ("ema_beta", "uncertainty_beta"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigValueError(f"srlora.{name}={getattr(self, name)}: must be in [0, 1)")
        if self.schedule not in ("fixed", "paper"):
            raise ConfigValueError(f"srlora.schedule={self.schedule!r}: choose 'fixed' or 'paper'")
        if self.schedule == "paper":
            given = [f"{name}={getattr(self, name)}" for name in self.FIXED_SCHEDULE_KEYS
                     if getattr(self, name) != self.__dataclass_fields__[name].default]
            if given:
                raise ConfigValueError(
                    f"srlora.{', srlora.'.join(given)} not used: srlora.schedule=paper derives the steps and the pairs "
                    "per switch from srlora.target_rank and pairs_fraction; set srlora.schedule=fixed to give them yourself")
        if not 0.0 < self.pairs_fraction < 1.0:
            raise ConfigValueError(f"srlora.pairs_fraction={self.pairs_fraction}: must be in (0, 1) (the paper uses 0.5)")
        if self.scope not in ("layer", "global"):
            raise ConfigValueError(f"srlora.scope={self.scope!r}: choose 'layer' or 'global'")
        if self.svd not in ("full", "randomized"):
            raise ConfigValueError(f"srlora.svd={self.svd!r}: choose 'full' or 'randomized'")
        if self.quantized_fusion not in ("requantize", "residual"):
            raise ConfigValueError(f"srlora.quantized_fusion={self.quantized_fusion!r}: choose 'requantize' or 'residual'")

    def for_run(self, r: int, total_steps: int) -> "SRLoRAConfig":
        """This config with a concrete schedule for rank ``r`` and a run of ``total_steps`` optimizer steps: itself
        for schedule "fixed"; for "paper", pairs = round(pairs_fraction r), N = (target_rank - r) // pairs switches
        at every total_steps // N steps strictly before the last step (a switch at the end would re-initialise
        pairs that are never trained)."""
        if self.schedule == "fixed":
            return self
        pairs = max(1, round(self.pairs_fraction * r))
        if pairs >= r:
            raise ConfigValueError(f"srlora.pairs_fraction={self.pairs_fraction} re-initialises all r={r} pairs at "
                                   "once; lower it (the paper uses 0.5)")
        target = 3 * r if self.target_rank is None else self.target_rank
        if target < r + pairs:
            raise ConfigValueError(f"srlora.target_rank={target} leaves no switch: it must be at least adapter.r + "
                                   f"pairs per switch = {r} + {pairs}")
        switches = (target - r) // pairs
        interval = total_steps // switches
        if interval < 1 or interval >= total_steps:
            raise ConfigValueError(f"srlora.schedule=paper: {switches} switch(es) do not fit in {total_steps} training "
                                   "steps; train longer or lower srlora.target_rank")
        if interval < self.warmup_steps:
            raise ConfigValueError(f"srlora.schedule=paper: the first of {switches} switches would come at step "
                                   f"{interval}, before the warm-up ends (warmup_steps={self.warmup_steps}); train "
                                   "longer, shorten the warm-up or lower srlora.target_rank")
        return dataclasses.replace(self, schedule="fixed", pairs_per_recomposition=pairs, start_step=interval,
                                   interval=interval, end_step=total_steps - 1)

    def checked_schedule(self, r: int, total_steps: int | None, rank_key: str = "r") -> tuple["SRLoRAConfig", list[int]]:
        """This config made concrete for rank ``r`` (`for_run`; a "paper" schedule needs ``total_steps``) and the
        optimizer steps at which it recomposes within ``total_steps`` (all of them when None), checked: fewer pairs
        per switch than the rank, and at least one switch in the run. ``rank_key`` names r in the messages."""
        config = self
        if self.schedule == "paper":  # steps and pairs follow from the rank and the run's length
            if total_steps is None:
                raise ConfigValueError("srlora.schedule=paper spreads the switches over the run: pass total_steps")
            config = self.for_run(r, total_steps)
        k = config.pairs_per_recomposition
        if k >= r:
            raise ConfigValueError(f"srlora.pairs_per_recomposition={k} must be smaller than the rank {rank_key}={r}: "
                                   "fusing every pair at once would leave nothing trained")
        steps = config.recomposition_steps()
        if total_steps is not None:
            steps = [s for s in steps if s <= total_steps]
            if not steps:
                raise ConfigValueError(
                    f"srlora schedule (start_step={config.start_step}, interval={config.interval}) never fires "
                    f"within {total_steps} training steps; lower srlora.start_step below train.max_steps")
        return config, steps

    def recomposition_steps(self) -> list[int]:
        """Optimizer steps (1-based count of completed steps) at which a recomposition happens."""
        return list(range(self.start_step, self.end_step + 1, self.interval))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
