"""Recipe configuration: configs/defaults.yaml (every key, documented) <- configs/recipes/<name>.yaml <- CLI
``key.sub=value`` overrides, merged by OmegaConf onto a typed schema, so an unknown key or a wrong type is an
error at start-up that names the key, the value and the nearest valid keys."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from recipes.config_files import ROOT  # the folder holding configs/ (a clone or the installed package)
from selora.config import ADAPTER_METHODS, SeLoRAConfig, SRLoRAConfig

RECIPES = ROOT / "configs" / "recipes"
DEFAULTS = ROOT / "configs" / "defaults.yaml"


class ConfigError(ValueError):
    """A recipe, key or value the launcher cannot use; the message is one line naming it and the fix."""


@dataclass
class ModelSection:
    path: Optional[str] = None
    preset: str = "smollm2_135m_instruct"
    dtype: str = "auto"
    quantization: str = "none"
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "auto"
    gradient_checkpointing: bool = False
    attention: str = "auto"
    compile: str = "auto"
    fused_loss: str = "auto"
    seed: int = 0
    gguf_cache: bool = True


@dataclass
class TokenizerSection:
    path: Optional[str] = None


@dataclass
class DataSection:
    train_files: List[Any] = field(default_factory=lambda: ["configs/data/default_instructions.jsonl"])
    eval_files: List[Any] = field(default_factory=lambda: ["configs/data/default_eval.jsonl"])
    format: str = "auto"
    fields: Dict[str, str] = field(default_factory=dict)
    mix_records: Optional[int] = None
    num_proc: str = "auto"
    max_length: int = 256
    packing: bool = False
    padding_free: bool = False
    pad_to_multiple_of: str = "auto"
    eval_fraction: float = 0.05
    mask_prompt: bool = True
    max_train_records: Optional[int] = None
    max_eval_records: Optional[int] = 64


def _schema_type(hint):
    """A library field's type as OmegaConf can hold it: tuples become lists, ``X | None`` Optional[X], and a
    type OmegaConf does not know stays untyped (the library's dataclass still checks the value)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _schema_type(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if type(None) in args else inner
    if origin in (tuple, list):
        return List[_schema_type(args[0]) if args else Any]
    if origin is dict or hint is dict:
        return Dict[str, Any]
    return hint if hint in (int, float, bool, str) else Any


def section_from(name: str, library_classes: tuple[type, ...], extra: list[tuple] = (), skip: tuple[str, ...] = ()):
    """A schema section holding every field of ``library_classes`` (later classes add theirs) with the
    library's types and defaults, plus ``extra`` (name, type, field) entries first: the library's dataclasses
    are the one source of truth for what an adapter or SRLoRA schedule takes and what it defaults to."""
    fields, seen = list(extra), {entry[0] for entry in extra} | set(skip)
    for cls in library_classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, (tuple, list, dict)):  # mutable in the schema: one copy per config
                copy = (lambda d=default: dict(d)) if isinstance(default, dict) else (lambda d=default: list(d))
                fields.append((f.name, _schema_type(hints[f.name]), field(default_factory=copy)))
            else:
                fields.append((f.name, _schema_type(hints[f.name]), field(default=default)))
    return dataclasses.make_dataclass(name, fields)


# adapter.method picks the library class (selora's registry of adapter methods); the other adapter keys are the
# fields of every registered method's class (one method's extra keys are ignored by the others).
AdapterSection = section_from("AdapterSection", tuple(ADAPTER_METHODS.values()),
                              extra=[("method", str, field(default=SeLoRAConfig.method))])
# srlora.enabled switches it on; the schedule's warm-up is train.warmup_steps, not a key of its own.
SRLoRASection = section_from("SRLoRASection", (SRLoRAConfig,), extra=[("enabled", bool, field(default=False))],
                             skip=("warmup_steps",))


@dataclass
class TrainSection:
    seed: int = 0
    max_steps: int = 60
    epochs: Optional[float] = None
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 2
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 6
    min_lr_ratio: float = 0.0
    decay_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 20
    log_every: int = 1
    save_every: int = 30
    output_dir: str = "runs/${recipe_name}"
    resume: str = "auto"
    overwrite: bool = False
    export_peft: bool = True
    export_best: bool = False
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    save_merged: bool = False
    tensorboard: bool = True
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    time_breakdown: bool = False
    profile_steps: List[int] = field(default_factory=list)
    profile_python: bool = False
    sample_prompts: List[str] = field(default_factory=list)
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    stop_grace_s: float = 25.0
    collective_timeout_s: float = 600.0


@dataclass
class DeepSpeedSection:
    config: Optional[str] = None
    zero3_init: bool = True
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    recipe_name: str = "default"
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    srlora: SRLoRASection = field(default_factory=SRLoRASection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


def valid_keys(node=None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (deepspeed.overrides is free-form)."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for key in node:
        value = node[key] if key != "overrides" else None
        full = f"{prefix}{key}"
        keys += valid_keys(value, full + ".") if isinstance(value, DictConfig) else [full]
    return keys


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _recipe_path(recipe: str) -> Path:
    if recipe.endswith((".yaml", ".yml")):
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe!r} does not exist")
        return path
    path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(available_recipes())} "
                          "(or pass a path to a .yaml)")
    return path


def nearest_keys(key: str, n: int = 3) -> list[str]:
    """Valid keys a misspelled dotted ``key`` most likely meant: the nearest section(s), then the nearest key in
    them (``trian.max_steps`` -> ``train.max_steps``, ``train.lerning_rate`` -> ``train.learning_rate``)."""
    keys = valid_keys()
    by_section: dict[str, list[str]] = {}
    for k in keys:
        section, _, leaf = k.rpartition(".")
        by_section.setdefault(section, []).append(leaf)
    section, _, leaf = key.rpartition(".")
    sections = [section] if section in by_section else difflib.get_close_matches(section, list(by_section), n=2, cutoff=0.6)
    near = []
    for candidate in sections:
        leaves = by_section[candidate]
        hits = [leaf] if leaf in leaves else difflib.get_close_matches(leaf, leaves, n=n, cutoff=0.6)
        near += [f"{candidate}.{h}" if candidate else h for h in hits]
    if not near:  # no section is close: the nearest whole keys, then keys whose last part is close
        near = difflib.get_close_matches(key, keys, n=n, cutoff=0.5)
    if not near:
        leaves = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=n)
        near = [k for k in keys if k.rsplit(".", 1)[-1] in leaves]
    return near[:n]


def _unknown_key_message(key: str, source: str) -> str:
    near = nearest_keys(key)
    hint = f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else ""
    return f"unknown config key {key!r} in {source}{hint}"


def _dotted_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, DictConfig):
        return [k for key in node for k in _dotted_keys(node[key], f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as error:
        # OmegaConf names the first unknown part (``trian``); the full key (``trian.max_steps``) is in ``other``.
        unknown = str(error.full_key)
        full = next((k for k in _dotted_keys(other) if k == unknown or k.startswith(unknown + ".")), unknown)
        raise ConfigError(_unknown_key_message(full, source)) from None
    except ValidationError as error:
        if isinstance(OmegaConf.select(base, str(error.full_key)), ListConfig):
            raise ConfigError(f"{source}: {error.full_key}={error.value!r} must be a list; write "
                              f"{error.full_key}=[{error.value}]") from None
        raise ConfigError(f"{source}: {error.full_key}={error.value!r} has the wrong type: "
                          f"{str(error).splitlines()[0]}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {str(error).splitlines()[0]}") from None


def _parse_override(item: str):
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as error:
        raise ConfigError(f"override {item!r}: {str(error).splitlines()[0]}") from None


def resolve(recipe: str, overrides: list[str] = ()) -> DictConfig:
    """The full, typed config of ``recipe`` with ``overrides`` applied; raises ConfigError on any problem."""
    config = OmegaConf.structured(Config)
    config = _merge(config, OmegaConf.load(DEFAULTS), str(DEFAULTS.relative_to(ROOT)))
    path = _recipe_path(recipe)
    recipe_values = OmegaConf.load(path)
    config = _merge(config, recipe_values, str(path))
    if "recipe_name" not in recipe_values:
        config.recipe_name = path.stem
    for item in overrides:
        config = _merge(config, _parse_override(item), f"override {item!r}")
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve the config: {str(error).splitlines()[0]}") from None
    return config


def default_deepspeed(config: DictConfig, world_size: int) -> str | None:
    """Under a multi-process launch with no DeepSpeed config chosen, use ZeRO-2 (data parallel, the cheapest
    stage); returns the one line that says so, or None when nothing was changed."""
    if world_size <= 1 or config.deepspeed.config is not None:
        return None
    config.deepspeed.config = "zero2"
    return (f"{world_size} processes and deepspeed.config is null: using ZeRO-2 (configs/deepspeed/zero2.json); "
            "set deepspeed.config=zero3 (or a JSON path) to choose another")


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config)
