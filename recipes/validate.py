"""Every check of a recipe config that needs neither data nor weights, in one place, run before anything is
read or loaded: cfg.train's numbers and choices, the adapter and SRLoRA settings (built into the library's own
dataclasses, which validate themselves), the DeepSpeed config (through DeepSpeed's own parser). A bad value raises one error whose message
names the key, the value and the fix. (The output directory and the checkpoint to resume are checked by
recipes/resume.py's `plan_resume`.)

What the checks resolve is kept, not thrown away: `validate` returns a `RunPlan`, and recipes/finetune.py passes
its values down instead of resolving them again. The device this process trains on is known before any process
group starts (a GPU machine's cuda:LOCAL_RANK, else the CPU), so the values that depend on it (dtype, padding
multiple, attention) are resolved here, once, for that device."""
from __future__ import annotations

import dataclasses
import os

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import selora
from recipes import engine as engines
from recipes.compiled_regions import CompileConfigError, compile_choice
from recipes.data import pad_multiple
from recipes.data_prepare import check_data_config
from recipes.fused_loss import FusedLossConfigError, fused_loss_choice
from recipes.modeling import Precision, resolve_precision
from recipes.packed_attention import AttentionConfigError, resolve_attention
from recipes.profiling import profile_window
from recipes.stop_request import CATCHABLE as CATCHABLE_SIGNALS
from recipes.trackers import TrackerConfigError, check_report_to

class RecipeConfigError(ValueError):
    """A cfg.train (or other recipe) value the recipe cannot use; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a recipe config resolves to before any data, weights or process group: `validate`'s result."""
    adapter: selora.LoRAConfig  # cfg.adapter as the library's config of its method
    srlora: selora.SRLoRAConfig | None  # None when srlora.enabled is false
    device: torch.device  # where this process trains (`training_device`)
    world_size: int  # the processes the launcher started (1 without one)
    precision: Precision  # model.dtype, the compute dtype, model.quantization (its backend: checked once in the run)
    pad_multiple: int  # data.pad_to_multiple_of on this device
    attention: str  # model.attention on this device, before the loaded model's family narrows it (fit_to_model)
    deepspeed: dict | None  # the DeepSpeed config, every "auto" but the model-size ones filled; None: plain PyTorch
    compiled: bool = False  # model.compile on this device: the decoder regions are compiled once the engine is built
    compile_line: str = "model.compile=false: eager"  # the log line that says which, and why
    fused_loss: bool = False  # model.fused_loss on this device and engine: the training loss skips the logits
    fused_loss_line: str = "model.fused_loss=false: logits, then transformers' cross-entropy"


def training_device(cfg) -> torch.device:
    """The device this process will train on: the CPU without CUDA; else the GPU of its LOCAL_RANK under a launcher
    (GPU 0 for a DeepSpeed run without one, which makes itself rank 0 of a one-process group). recipes/finetune.py's
    `setup_distributed` makes it the current device."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if not launched() and cfg.deepspeed.config is not None:
        return torch.device("cuda", 0)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """Whether a launcher started this process (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    """The processes a launcher started, else 1: the size of the group the run makes."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def validate(cfg, device: torch.device | None = None) -> RunPlan:
    """Check ``cfg``; returns what it resolves to for ``device`` (default: `training_device`)."""
    device = training_device(cfg) if device is None else device
    world_size = launched_world_size()
    check_train(cfg.train)
    check_best_eval(cfg.train, cfg.data)
    try:
        check_report_to(cfg.train)
    except TrackerConfigError as error:
        raise RecipeConfigError(str(error)) from None
    padding = pad_multiple(cfg.data, device)  # data.pad_to_multiple_of: auto or a whole number >= 1
    check_example_boundaries(cfg.data)
    check_data_config(cfg.data)  # data sources, formats, fields, weights, mix_records, num_proc
    try:
        attention = resolve_attention(cfg.model.attention, bool(cfg.data.padding_free), device)
    except AttentionConfigError as error:
        raise RecipeConfigError(str(error)) from None
    try:
        compiled, compile_line = compile_choice(cfg.model.compile, device, cfg.model.quantization)
    except CompileConfigError as error:
        raise RecipeConfigError(str(error)) from None
    try:
        profile_window(cfg.train.profile_steps, bool(cfg.train.profile_python))
    except ValueError as error:
        raise RecipeConfigError(str(error)) from None
    adapter = adapter_config_from(cfg.adapter)
    srlora = srlora_config_from(cfg) if cfg.srlora.enabled else None
    if srlora is not None:
        check_srlora_schedule(srlora, adapter, int(cfg.train.max_steps or 0) or None)
    precision = resolve_precision(cfg.model, device)
    deepspeed = None
    if cfg.deepspeed.config is not None:  # what DeepSpeed would refuse once the model is loaded, refused now
        deepspeed = engines.planned_deepspeed_config(cfg, world_size, precision.loss_scaling)
        engines.check_deepspeed_config(cfg, deepspeed)
    try:
        zero_stage = int(deepspeed.get("zero_optimization", {}).get("stage", 0)) if deepspeed else 0
        fused_loss, fused_loss_line = fused_loss_choice(cfg.model.fused_loss, device, zero_stage)
    except FusedLossConfigError as error:
        raise RecipeConfigError(str(error)) from None
    return RunPlan(adapter=adapter, srlora=srlora, device=device, world_size=world_size, precision=precision,
                   pad_multiple=padding, attention=attention, deepspeed=deepspeed, compiled=compiled,
                   compile_line=compile_line, fused_loss=fused_loss, fused_loss_line=fused_loss_line)


def check_example_boundaries(data_cfg) -> None:
    """data.packing and data.padding_free (one or the other) put several examples in one row and keep attention
    inside each through positions that restart; transformers reads the boundaries from them since 4.53
    (masking_utils). An older transformers would silently let the examples attend to each other."""
    if not (data_cfg.packing or data_cfg.padding_free):
        return
    if data_cfg.packing and data_cfg.padding_free:
        raise RecipeConfigError("data.packing=true and data.padding_free=true: choose one (padding_free already packs "
                                "each micro-batch's examples end to end into one row; packing fills micro_batch_size "
                                "rows of max_length)")
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        import transformers
        key = "data.padding_free" if data_cfg.padding_free else "data.packing"
        raise RecipeConfigError(f"{key}=true needs transformers >= 4.53 (it keeps attention inside each example "
                                f"from restarting positions); this is {transformers.__version__}: pip install "
                                f"'transformers>=4.53', or set {key}=false")


def check_train(train) -> None:
    def bad(key: str, rule: str):
        raise RecipeConfigError(f"train.{key}={train[key]!r}: {rule}")

    if not train.learning_rate > 0:
        bad("learning_rate", "must be > 0, e.g. train.learning_rate=3e-4")
    for key in ("micro_batch_size", "gradient_accumulation_steps"):
        if train[key] < 1:
            bad(key, "must be a whole number >= 1")
    for key in ("warmup_steps", "eval_every", "log_every", "save_every", "max_steps"):
        if train[key] is not None and train[key] < 0:
            bad(key, "must be >= 0")
    for key in ("weight_decay", "max_grad_norm"):
        if train[key] is not None and train[key] < 0:
            bad(key, "must be >= 0 (0 turns it off)")
    if not train.max_steps and not (train.epochs and train.epochs > 0):
        raise RecipeConfigError(f"train.max_steps={train.max_steps} and train.epochs={train.epochs}: nothing to "
                                "train; set train.max_steps > 0 (optimizer steps) or train.epochs > 0")
    if train.lr_scheduler not in engines.LR_SCHEDULES:
        bad("lr_scheduler", f"choose one of {', '.join(engines.LR_SCHEDULES)}")
    if not 0 <= train.min_lr_ratio < 1:
        bad("min_lr_ratio", "must be in [0, 1): the share of learning_rate that cosine and wsd end at")
    if train.min_lr_ratio and train.lr_scheduler not in engines.FLOORED_SCHEDULES:
        bad("min_lr_ratio", f"only {' and '.join(engines.FLOORED_SCHEDULES)} end at a floor; set "
                            f"train.lr_scheduler=cosine or train.min_lr_ratio=0")
    if not 0 < train.decay_ratio <= 1:
        bad("decay_ratio", "must be in (0, 1]: the share of the steps that wsd spends decaying, e.g. 0.1")
    for key in ("stop_grace_s", "collective_timeout_s"):
        if not train[key] > 0:
            bad(key, "must be > 0 (seconds)")
    unknown = [name for name in train.stop_signals if name not in CATCHABLE_SIGNALS]
    if unknown:
        raise RecipeConfigError(f"train.stop_signals={list(train.stop_signals)!r}: {unknown[0]!r} is not a signal a "
                                f"run can catch; choose from {', '.join(CATCHABLE_SIGNALS)}")


def check_best_eval(train, data) -> None:
    """train.export_best and train.early_stopping_* need evaluations: eval data and train.eval_every > 0."""
    if train.early_stopping_patience < 0:
        raise RecipeConfigError(f"train.early_stopping_patience={train.early_stopping_patience}: must be >= 0 (the "
                                "evaluations without improvement before stopping; 0 never stops early)")
    if not train.early_stopping_min_delta >= 0:
        raise RecipeConfigError(f"train.early_stopping_min_delta={train.early_stopping_min_delta}: must be >= 0")
    uses = [f"train.{key}={train[key]}" for key in ("export_best", "early_stopping_patience") if train[key]]
    if not uses:
        return
    verb = "needs" if len(uses) == 1 else "need"
    if not train.eval_every:
        raise RecipeConfigError(f"{' and '.join(uses)} {verb} evaluations: set train.eval_every > 0 (now "
                                f"{train.eval_every})")
    if not data.eval_files and not data.eval_fraction:
        raise RecipeConfigError(f"{' and '.join(uses)} {verb} eval data: give data.eval_files, or "
                                "data.eval_fraction > 0 to split it off the training data")
    if data.max_eval_records == 0:
        raise RecipeConfigError(f"{' and '.join(uses)} {verb} eval data: data.max_eval_records=0 keeps none; "
                                "set it > 0 (or null for all)")


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def adapter_config_from(adapter) -> selora.LoRAConfig:
    """cfg.adapter -> the library config its ``method`` names, built from the section's fields of that class
    (validated on construction; errors are prefixed with ``adapter.``)."""
    try:
        cls = selora.method_config(adapter.method)
        return cls(**{f.name: _plain(adapter[f.name]) for f in dataclasses.fields(cls)})
    except selora.ConfigValueError as error:
        message = str(error)
        raise selora.ConfigValueError(message if message.startswith("adapter.") else f"adapter.{message}") from None


def srlora_config_from(cfg) -> selora.SRLoRAConfig:
    """cfg.srlora -> selora.SRLoRAConfig, its warm-up being the run's (train.warmup_steps)."""
    values = {f.name: _plain(cfg.srlora[f.name]) for f in dataclasses.fields(selora.SRLoRAConfig)
              if f.name != "warmup_steps"}
    return selora.SRLoRAConfig(**values, warmup_steps=int(cfg.train.warmup_steps))


def check_srlora_schedule(srlora: selora.SRLoRAConfig, adapter: selora.LoRAConfig, total_steps: int | None) -> None:
    """The checks selora.SRLoRA makes once it has a model, made before there is one (a "paper" schedule is
    checked once the run's length is known)."""
    if srlora.schedule == "paper" and total_steps is None:
        return
    srlora.checked_schedule(adapter.r, total_steps, rank_key="adapter.r")
