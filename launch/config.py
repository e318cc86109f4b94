"""Recipe configuration: configs/defaults.yaml (every key, documented) <- configs/recipes/<name>.yaml <- CLI
``key.sub=value`` overrides, merged by OmegaConf onto a typed schema, so an unknown key or a wrong type is an
error at start-up that names the key, the value and the nearest valid keys."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
DEFAULTS = ROOT / "configs" / "defaults.yaml"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    seed: int = 0


@dataclass
class TokenizerSection:
    path: Optional[str] = None


@dataclass
class DataSection:
    train_files: List[str] = field(default_factory=lambda: ["configs/data/default_instructions.jsonl"])
    eval_files: List[str] = field(default_factory=lambda: ["configs/data/default_eval.jsonl"])
    format: str = "auto"
    max_length: int = 256
    packing: bool = False
    eval_fraction: float = 0.05
    mask_prompt: bool = True
    max_train_records: Optional[int] = None
    max_eval_records: Optional[int] = 64


@dataclass
class AdapterSection:
    method: str = "selora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    spectral_ratio: float = 0.5
    n_coefficients: Optional[int] = None
    basis: str = "haar"
    shared_locations: bool = True
    seed: int = 0


@dataclass
class SRLoRASection:
    enabled: bool = False
    start_step: int = 10
    end_step: int = 50
    interval: int = 10
    pairs_per_recomposition: int = 1
    ema_beta: float = 0.85
    uncertainty_beta: float = 0.85
    scope: str = "layer"
    svd: str = "full"
    quantized_fusion: str = "residual"


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
    max_grad_norm: float = 1.0
    eval_every: int = 20
    log_every: int = 1
    save_every: int = 30
    output_dir: str = "runs/${recipe_name}"
    resume: str = "auto"
    export_peft: bool = True
    save_merged: bool = False
    tensorboard: bool = True
    sample_prompts: List[str] = field(default_factory=list)


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


def _unknown_key_message(key: str, source: str) -> str:
    keys = valid_keys()
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not near:  # a misspelled section: suggest keys under the nearest section
        near = difflib.get_close_matches(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in keys], n=3)
        near = [k for k in keys if k.rsplit(".", 1)[-1] in near][:3]
    hint = f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else ""
    return f"unknown config key {key!r} in {source}{hint}"


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as error:
        raise ConfigError(_unknown_key_message(str(error.full_key), source)) from None
    except ValidationError as error:
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


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config)
