"""The training engine: one small interface over plain PyTorch and DeepSpeed.

The loop in recipes/finetune.py only ever touches:
    engine(**batch)        forward (through DeepSpeed's engine when there is one)
    engine.backward(loss)  backward of one micro-batch whose loss is already its share of the optimizer step's
                           loss (summed over its learned tokens / the step's learned tokens on all ranks), so
                           gradients add up over micro-batches and ranks to the step's token-mean gradient
    engine.step() -> bool  end of a micro-batch; True when an optimizer step happened (accumulation boundary)
    engine.accumulation    micro-batches per optimizer step
    engine.scheduler       the learning-rate schedule (`lr_schedule`, the same for both engines)
    engine.optimizer       the torch optimizer, or DeepSpeed's (what SRLoRA resets rows in)
    engine.module          the model (unwrapped)
    engine.current_lr()    the learning rate the next optimizer step will use
    engine.train() / engine.eval()
    engine.save(dir) / engine.load(dir)   optimizer + scheduler (+ DeepSpeed's own files) in one directory
    engine.full_state_dict()              every weight, whole (ZeRO-3 gathers to rank 0), for a merged export

Everything DeepSpeed-specific lives in this file: the JSON configs under configs/deepspeed/, filling their "auto"
values from cfg.train (once per start: `planned_deepspeed_config`, which recipes/validate.py calls) and from the
model's size (`sized_for_model`), deepspeed.initialize, and the ZeRO-3 init context for model loading; and in
recipes/zero3_one_rank.py, the ZeRO-3 machinery that has nothing to do on one rank, switched off.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from recipes import config_files, zero3_one_rank
from recipes.modeling import resolve_precision

CONFIG_DIR = config_files.CONFIGS / "deepspeed"
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
ENGINE_STATE_FILE = "engine_state.pt"
# cfg.train.lr_scheduler -> transformers' schedule of that shape (get_scheduler), linear warm-up first.
LR_SCHEDULES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup",
                "wsd": "warmup_stable_decay"}
# The schedules that end at train.min_lr_ratio x the peak (linear ends at 0, constant never decays).
FLOORED_SCHEDULES = ("cosine", "wsd")


class EngineConfigError(ValueError):
    """A DeepSpeed config or a cfg.train value the engine cannot use; the message names the value and the fix."""


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EngineConfigError("the model has no trainable parameters: apply adapters (selora.apply) before "
                                "building the engine")
    return params


def lr_schedule(optimizer: torch.optim.Optimizer, train, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule both engines step once per optimizer step (DeepSpeed is handed this object).

    transformers' get_scheduler: a linear warm-up over train.warmup_steps, then up to ``total_steps``
      cosine    half a cosine from the peak down to train.min_lr_ratio x the peak
      linear    straight down to 0
      constant  the peak
      wsd       warm-up, stable at the peak, then the last train.decay_ratio of the steps a cosine down to
                train.min_lr_ratio x the peak (warmup_stable_decay; its warm-up starts at that floor)"""
    from transformers import get_scheduler

    kind, warmup = str(train.lr_scheduler), int(train.warmup_steps)  # a known kind: recipes/validate.py checked it
    floor = float(train.min_lr_ratio)
    extra = {}
    if kind == "cosine":
        extra = {"min_lr_rate": floor}
    elif kind == "wsd":
        decay = min(max(1, round(float(train.decay_ratio) * total_steps)), max(0, total_steps - warmup))
        extra = {"num_decay_steps": decay, "min_lr_ratio": floor}
    return get_scheduler(LR_SCHEDULES[kind], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra)


def loss_scaling(cfg) -> bool:
    """Whether training computes in float16 (model.dtype=float16, or a 4-bit base computing in it): its gradients
    underflow without a loss scale (bfloat16 and float32 have float32's range and need none). For callers without
    a run plan; the recipe passes the plan's ``precision.loss_scaling`` instead."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return resolve_precision(cfg.model, device).loss_scaling


# ----- plain PyTorch ---------------------------------------------------------------------------------------
class PlainEngine:
    """One process, no DeepSpeed: AdamW, manual gradient accumulation, clipping, the shared lr schedule, and a
    dynamic loss scale (torch.amp.GradScaler) when training computes in float16."""

    def __init__(self, model: torch.nn.Module, cfg, total_steps: int, loss_scale: bool | None = None):
        """``loss_scale``: whether training computes in float16 (the run plan's); None works it out from cfg."""
        train = cfg.train
        self.module = model
        self.params = trainable_parameters(model)
        # The fused kernel on GPU: one launch for every adapter tensor instead of a handful per tensor group.
        fused = all(p.is_cuda for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=train.learning_rate, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                           weight_decay=train.weight_decay, fused=fused or None)
        self.scheduler = lr_schedule(self.optimizer, train, total_steps)
        # float16 gradients underflow without a loss scale; the adapter weights (and so their gradients and
        # AdamW's state) stay float32, which GradScaler needs to unscale them.
        loss_scale = loss_scaling(cfg) if loss_scale is None else loss_scale
        self.scaler = torch.amp.GradScaler(self.params[0].device.type) if loss_scale else None
        self.accumulation = int(train.gradient_accumulation_steps)
        self.max_grad_norm = train.max_grad_norm
        self.micro_steps = 0

    def __call__(self, **batch):
        return self.module(**batch)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already this micro-batch's share of the step's loss: gradients just add up.
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> bool:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return False
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is None:
            self.optimizer.step()
            self.scheduler.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf/nan
            self.scaler.update()  # which then lowers the scale
            if self.scaler.get_scale() >= scale:  # as DeepSpeed: a skipped step does not advance the schedule
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path) -> None:
        """Optimizer moments and scheduler position (the adapter weights are saved by the checkpoint)."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "micro_steps": self.micro_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, directory / ENGINE_STATE_FILE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / ENGINE_STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


# ----- DeepSpeed ---------------------------------------------------------------------------------------------
def import_deepspeed():
    """``import deepspeed``, without the MLflow import it makes on the way when MLflow is installed: DeepSpeed's
    autotuner (which selora never runs) imports it at module level, about 3 s of every rank's start on a 2-core CPU
    (MLflow brings scipy, pandas and fastapi). MLflow stays importable: train.report_to=[mlflow] imports it later as
    usual. Every first import of DeepSpeed on the recipe's path goes through here."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError; the autotuner then records "no MLflow"
        try:
            import deepspeed  # noqa: F401
        finally:
            del sys.modules["mlflow"]
    import deepspeed
    return deepspeed


class DeepSpeedEngine:
    """The same interface over ``deepspeed.initialize``'s engine."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, train, total_steps: int):
        deepspeed = import_deepspeed()
        from deepspeed.utils import nvtx

        # DeepSpeed wraps its hooks in NVTX ranges: two accelerator calls per hook, over a million per step at
        # the 1B shape under ZeRO-3. Nsight users set deepspeed.utils.nvtx.enable_nvtx = True again.
        nvtx.enable_nvtx = False
        # DeepSpeed 0.19.8 reduces gradients through torch.distributed.reduce_scatter_tensor, which torch 2.13
        # deprecates: a FutureWarning (two log lines) per gradient bucket, 4,800 lines in a 30-step CPU run.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
                                category=FutureWarning)
        self.config = ds_config
        self.fetch_units = whole_layer_fetch(model, ds_config)
        zero = ds_config.get("zero_optimization", {})
        self.keeps_weights_gathered = (zero.get("stage") == 3 and
                                       zero.get("stage3_param_persistence_threshold") == ONE_RANK_PERSISTENCE)
        # DeepSpeed builds the optimizer, then the schedule on it (the plain engine's, `lr_schedule`); it steps the
        # schedule at each accumulation boundary and saves and loads its state with the checkpoint.
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable_parameters(model), config=ds_config,
            lr_scheduler=lambda optimizer: lr_schedule(optimizer, train, total_steps))
        self.module = self.ds.module
        self.optimizer = self.ds.optimizer
        self.accumulation = int(self.ds.gradient_accumulation_steps())
        # What ZeRO-3 does for nothing on one rank, switched off: phrases for the run's log (recipes/finetune.py)
        self.one_rank_changes = zero3_one_rank.switch_off(self.ds) if self.keeps_weights_gathered else []

    def __call__(self, **batch):
        return self.ds(**batch)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already this micro-batch's share of the step's loss over all ranks: no division by the
        # accumulation steps (scale_wrt_gas=False), and x ranks to undo the mean DeepSpeed takes over ranks, so the
        # reduced gradient is their sum. (Its fp16 loss scale, when on, DeepSpeed applies and removes itself.)
        self.ds.backward(loss * self.ds.dp_world_size, scale_wrt_gas=False)

    def step(self) -> bool:
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        return boundary

    def current_lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def save(self, directory: Path) -> None:
        """DeepSpeed's checkpoint (a collective): trainable weights, optimizer shards, scheduler. Frozen base
        weights are left out; the base is reloaded from the model and selora's adapter replays its changes."""
        self.ds.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False,
                                exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory.parent), tag=directory.name, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole weights; under ZeRO-3 a collective that gathers them to rank 0 (others get an empty dict)."""
        if self.ds.zero_optimization_partition_weights():
            return self.ds._zero3_consolidated_16bit_state_dict() or {}
        return self.module.state_dict()


def whole_layer_fetch(model: torch.nn.Module, ds_config: dict) -> list[str]:
    """Under ZeRO-3, each decoder layer (the classes the model names in ``_no_split_modules``, e.g.
    LlamaDecoderLayer) is gathered and released as one unit: one hook pair and one gather per layer, instead of one
    per projection, base weight and adapter factor. Returns the class names made units ([] when none).

    DeepSpeed (0.19.8) reduces a unit's gradients in a full backward hook on the unit, which fires once the
    gradient with respect to the unit's inputs exists, or, where no input requires a gradient (the first layer,
    after frozen embeddings), as soon as the one with respect to its outputs does: before the layer's own backward,
    whose weights it then meets released (a size-0 gradient, an error at the first backward). The model's input
    embeddings are therefore made to require a gradient (transformers' ``enable_input_require_grads``, which its
    gradient checkpointing already calls, as PEFT does), at the cost of the first layer's input-gradient products;
    tests/test_engine.py compares the gradients with per-module fetch's, with and without checkpointing. Left to
    DeepSpeed's per-module fetch when the config sets ``stage3_module_granularity_threshold`` (DeepSpeed's own
    rule) and for a model without ``enable_input_require_grads`` that does not checkpoint."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3 or zero.get("stage3_module_granularity_threshold"):
        return []
    checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if not checkpointing and not hasattr(model, "enable_input_require_grads"):
        return []
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__)
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules
    if not checkpointing:  # transformers' checkpointing has called it
        model.enable_input_require_grads()
    set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise EngineConfigError(f"deepspeed.config={name!r}: no such file")
        return path
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise EngineConfigError(f"deepspeed.config={name!r}: choose one of {known}, a path to a DeepSpeed JSON, "
                                "or null for plain PyTorch")
    return path


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EngineConfigError(f"deepspeed.config={str(path)!r} is not valid JSON ({error}); fix the file") from None
    if not isinstance(config, dict):
        raise EngineConfigError(f"deepspeed.config={str(path)!r} holds a {type(config).__name__}, not a JSON object")
    return config


def check_deepspeed_config(cfg, planned: dict) -> None:
    """What DeepSpeed would refuse at deepspeed.initialize, after the model has loaded, refused now: the resolved
    config (file, overrides, filled "auto" values) goes through DeepSpeed's own parser, and the optimizer type through
    its list of known ones (a scheduler section is refused by `deepspeed_json`: the lr schedule is selora's).
    ``planned``: `planned_deepspeed_config`'s result (or `deepspeed_config`'s)."""
    import pydantic
    import_deepspeed()
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig
    config = sized_for_model(planned, None)
    where = f"deepspeed.config={str(cfg.deepspeed.config)!r} (with deepspeed.overrides)"
    # DeepSpeed takes its own optimizers (any case) and any torch.optim class by name.
    optimizer = config.get("optimizer", {}).get("type")
    if optimizer is not None and optimizer.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, optimizer):
        raise EngineConfigError(f"{where}: optimizer.type={optimizer!r} is not one DeepSpeed knows; choose one of "
                                f"{DEEPSPEED_OPTIMIZERS} or a torch.optim class")
    # DeepSpeed's parser checks the batch sizes against the process group it sees, none yet (one process): the
    # world size was checked by planned_deepspeed_config, so the copy it parses states one process's batch.
    parsed = copy.deepcopy(config)
    parsed["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(parsed)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        raise EngineConfigError(f"{where}: DeepSpeed refuses {_json_key(config, first['loc'], error.title)} = "
                                f"{first.get('input')!r}: {first['msg']}; fix or remove that key") from None
    except Exception as error:  # noqa: BLE001 - DeepSpeed's own checks raise assorted types; each means bad input
        raise EngineConfigError(f"{where}: DeepSpeed refuses it: {str(error).splitlines()[0]}") from None


def _json_key(config: dict, loc: tuple, model_name: str) -> str:
    """The dotted JSON key of a pydantic error's location, which DeepSpeed reports inside one section's model."""
    def holds(tree, path) -> bool:
        return not path or (isinstance(tree, dict) and path[0] in tree and holds(tree[path[0]], path[1:]))

    path = [str(part) for part in loc]
    sections = [name for name, value in config.items() if holds(value, path)]
    return ".".join([sections[0] if sections else model_name, *path])


def _merge(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _fill(section: dict, key: str, value) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def deepspeed_json(cfg) -> dict:
    """The DeepSpeed JSON cfg.deepspeed.config names, cfg.deepspeed.overrides (optional mapping) merged on top.

    Its "scheduler" section may only be "auto" (dropped): the learning rate is scheduled by `lr_schedule` for both
    engines, and DeepSpeed would silently prefer ours over the JSON's."""
    config = _read_json(resolve_config_path(str(cfg.deepspeed.config)))
    overrides = OmegaConf.select(cfg, "deepspeed.overrides", default=None)
    if overrides is not None:
        _merge(config, OmegaConf.to_container(overrides, resolve=True))
    scheduler = config.pop("scheduler", None)
    if scheduler is not None and scheduler.get("type", "auto") != "auto":
        raise EngineConfigError(f"deepspeed.config={str(cfg.deepspeed.config)!r} sets scheduler type "
                                f"{scheduler['type']!r}: selora schedules the learning rate for both engines; remove "
                                f"the \"scheduler\" section (from the JSON or deepspeed.overrides) and set "
                                f"train.lr_scheduler ({', '.join(LR_SCHEDULES)})")
    return config


def deepspeed_config(cfg, world_size: int, hidden_size: int | None = None) -> dict:
    """The DeepSpeed config named by cfg.deepspeed.config with every "auto" filled from cfg.train (and the ZeRO
    bucket sizes from ``hidden_size``): `planned_deepspeed_config`, then `sized_for_model`, for callers without a
    run plan."""
    return sized_for_model(planned_deepspeed_config(cfg, world_size, loss_scaling(cfg)), hidden_size)


def planned_deepspeed_config(cfg, world_size: int, loss_scale: bool) -> dict:
    """The DeepSpeed config named by cfg.deepspeed.config with every "auto" filled from cfg.train, but the ZeRO
    bucket sizes that follow the model's width (`sized_for_model` fills them).

    Values the JSON sets explicitly are kept. cfg.deepspeed.overrides (optional mapping) is merged on top,
    e.g. {"zero_optimization": {"stage3_param_persistence_threshold": 0}}. No "scheduler": the engine hands
    DeepSpeed `lr_schedule`'s. ``loss_scale``: whether training computes in float16 (DeepSpeed's "fp16")."""
    train = cfg.train
    config = deepspeed_json(cfg)
    micro, accumulation = int(train.micro_batch_size), int(train.gradient_accumulation_steps)
    _fill(config, "train_micro_batch_size_per_gpu", micro)
    _fill(config, "gradient_accumulation_steps", accumulation)
    _fill(config, "train_batch_size", micro * accumulation * world_size)
    _fill(config, "gradient_clipping", float(train.max_grad_norm or 0.0))
    if config["train_batch_size"] != config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world_size:
        raise EngineConfigError(
            f"DeepSpeed train_batch_size={config['train_batch_size']} != micro batch "
            f"{config['train_micro_batch_size_per_gpu']} x accumulation {config['gradient_accumulation_steps']} x "
            f"{world_size} ranks; set it to \"auto\"")

    on_cuda = torch.cuda.is_available()
    fp16 = config.setdefault("fp16", {})
    _fill(fp16, "enabled", loss_scale)  # DeepSpeed's own dynamic loss scale, as the plain engine's scaler
    bf16 = config.setdefault("bf16", {})
    _fill(bf16, "enabled", bool(on_cuda and torch.cuda.is_bf16_supported() and not fp16["enabled"]))

    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", float(train.learning_rate))
    _fill(params, "betas", list(ADAMW_BETAS))
    _fill(params, "eps", ADAMW_EPS)
    _fill(params, "weight_decay", float(train.weight_decay))
    if not on_cuda:  # FusedAdam / DeepSpeedCPUAdam need compiled ops; torch's AdamW is exact and always there
        params.setdefault("torch_adam", True)
        config.setdefault("zero_force_ds_cpu_optimizer", False)

    zero = config.setdefault("zero_optimization", {"stage": 0})
    if keeps_one_rank_gathered(zero, world_size):
        _fill(zero, "stage3_param_persistence_threshold", ONE_RANK_PERSISTENCE)
    return config


# A threshold no parameter exceeds: every weight is gathered once and never released.
ONE_RANK_PERSISTENCE = sys.maxsize


def keeps_one_rank_gathered(zero: dict, world_size: int) -> bool:
    """Whether ZeRO-3 keeps every weight gathered (the persistence threshold the JSON leaves "auto" filled with
    `ONE_RANK_PERSISTENCE`): on one rank, whose partition is the whole model, where the weights stay on the device.
    There a weight's gather is a view of its partition (no copy, no memory), and releasing and re-gathering it at
    every layer only costs DeepSpeed's hooks and, at a one-rank partition, a whole-stream synchronisation per
    fetch (`NoGatherCoalescedHandle.wait`, DeepSpeed 0.19.8). Not with ``offload_param``, whose partitions live on
    the host or NVMe: a persistent weight would be held on the device."""
    offload = (zero.get("offload_param") or {}).get("device", "none")
    return zero.get("stage") == 3 and world_size == 1 and offload in (None, "none")


def sized_for_model(planned: dict, hidden_size: int | None) -> dict:
    """A copy of ``planned`` with the ZeRO bucket sizes the JSON leaves "auto" filled from the model's width
    (defaults without one: the config ZeRO-3's init context builds the model under), every "auto" then filled."""
    config = copy.deepcopy(planned)
    zero = config["zero_optimization"]
    h = hidden_size
    _fill(zero, "reduce_bucket_size", h * h if h else 500_000_000)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * h * h) if h else 50_000_000)
    # 128 x hidden keeps every adapter factor up to r ~ 40 (r x intermediate) whole on each rank, where gathering
    # it per forward costs more host time than its memory is worth; every base matrix (>= hidden^2) stays
    # partitioned. configs/deepspeed/README.md has the reasoning for each ZeRO-3 setting.
    _fill(zero, "stage3_param_persistence_threshold", 128 * h if h else 100_000)
    leftover = [key for key, value in _walk(config) if value == "auto"]
    if leftover:
        raise EngineConfigError(f"DeepSpeed config keys {leftover} are \"auto\" but the engine has no value for "
                                "them; set them in the JSON")
    return config


def _walk(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree


def uses_deepspeed(cfg) -> bool:
    return cfg.deepspeed.config is not None


def zero3_init_context(cfg, planned: dict | None):
    """Context for building the base model sharded over ranks (ZeRO-3 with deepspeed.zero3_init), else a no-op.
    ``planned``: `planned_deepspeed_config`'s result (None: plain PyTorch).

    transformers also needs to know (HfDeepSpeedConfig) so that from_pretrained loads weights into the shards.
    """
    if planned is None or not cfg.deepspeed.zero3_init:
        return contextlib.nullcontext()
    if planned["zero_optimization"].get("stage", 0) != 3:
        return contextlib.nullcontext()
    return _zero3_init(sized_for_model(planned, None))


@contextlib.contextmanager
def _zero3_init(config: dict):
    deepspeed = import_deepspeed()
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(copy.deepcopy(config))  # noqa: F841 - must stay alive while the model loads
    with deepspeed.zero.Init(config_dict_or_path=config):
        yield
    del hf_config


def check_world_size(cfg, world_size: int) -> None:
    """Several processes need DeepSpeed (launch/train.py picks ZeRO-2 for them when none is set)."""
    if world_size > 1 and not uses_deepspeed(cfg):
        raise EngineConfigError(f"{world_size} processes but deepspeed.config is null: data-parallel training "
                                "needs DeepSpeed; set deepspeed.config=zero2 (or zero3)")


def build_engine(model: torch.nn.Module, cfg, steps: int, planned: dict | None, loss_scale: bool):
    """The engine for ``model`` (adapters applied) training ``steps`` optimizer steps: DeepSpeed's on
    ``planned`` (`planned_deepspeed_config`'s result, sized here for the model), or plain PyTorch when None.
    ``loss_scale``: whether training computes in float16. (The world size was checked by `check_world_size`.)"""
    if planned is None:
        return PlainEngine(model, cfg, steps, loss_scale)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return DeepSpeedEngine(model, sized_for_model(planned, hidden), cfg.train, steps)
