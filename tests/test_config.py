"""launch/config.py and launch/train.py: resolution, typed overrides, the schema derived from the library, the
ZeRO-2 default. (Every bad input's one-line error: tests/test_errors.py, driven by docs/errors.md.)"""
import dataclasses
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from launch import config as launch_config
from launch.config import ConfigError
from recipes.validate import validate

from conftest import TINY_MODEL

ROOT = launch_config.ROOT


def test_defaults_recipe_and_overrides_merge_in_order():
    cfg = launch_config.resolve("llama_srlora", ["train.max_steps=7", "adapter.r=4", "data.train_files=[a.jsonl]"])
    assert cfg.recipe_name == "llama_srlora" and cfg.adapter.method == "lora" and cfg.srlora.enabled
    assert cfg.train.max_steps == 7 and cfg.adapter.r == 4 and list(cfg.data.train_files) == ["a.jsonl"]
    assert cfg.train.output_dir == "runs/llama_srlora"  # interpolation resolved
    assert cfg.train.learning_rate == 3e-4  # untouched default


@pytest.mark.parametrize("recipe", launch_config.available_recipes())
def test_every_recipe_resolves(recipe):
    cfg = launch_config.resolve(recipe)
    assert cfg.adapter.method in ("lora", "selora")
    assert cfg.model.quantization == ("4bit" if recipe.startswith("qlora") else "none")
    if cfg.srlora.enabled:  # recompositions happen inside the run, at the schedule the recipe asks for
        plan = validate(cfg)
        steps = plan.srlora.for_run(plan.adapter.r, cfg.train.max_steps).recomposition_steps()
        assert steps and steps[0] >= cfg.train.warmup_steps and steps[-1] < cfg.train.max_steps


def test_misspelled_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lerning_rate'.*'train.learning_rate'"):
        launch_config.resolve("llama_selora", ["train.lerning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"'adaptr.r'.*did you mean 'adapter.r'"):
        launch_config.resolve("llama_selora", ["adaptr.r=3"])
    with pytest.raises(ConfigError, match=r"'trian.max_steps'.*did you mean 'train.max_steps'\?$"):
        launch_config.resolve("llama_selora", ["trian.max_steps=3"])


def test_wrong_type_and_unknown_recipe():
    with pytest.raises(ConfigError, match=r"train.max_steps='ten' has the wrong type"):
        launch_config.resolve("llama_selora", ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"unknown recipe 'llama_selor'; available: .*llama_selora"):
        launch_config.resolve("llama_selor")
    with pytest.raises(ConfigError, match="not key=value"):
        launch_config.resolve("llama_selora", ["train.max_steps"])


def test_recipe_file_with_unknown_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("adapter:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'adapter.rank' in .*mine.yaml"):
        launch_config.resolve(str(path))


def test_print_config_subprocess():
    result = subprocess.run([sys.executable, "launch/train.py", "--recipe", "llama_selora", "--print-config",
                             "adapter.r=12"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "recipe_name: llama_selora" in result.stdout and "  r: 12" in result.stdout


def library_defaults(*classes, skip=()) -> dict:
    out = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name not in skip:
                out[f.name] = list(default) if isinstance(default, tuple) else default
    return out


def test_adapter_and_srlora_schema_and_defaults_yaml_are_the_librarys():
    """One source of truth: the library's dataclasses. The schema is derived from them; defaults.yaml states no
    adapter default but the method (the launcher's own key), and its srlora section states exactly the library's
    defaults (recipe choices such as dropout 0.05 live in the recipe yamls)."""
    import selora
    adapter = library_defaults(selora.LoRAConfig, selora.SeLoRAConfig)
    srlora = library_defaults(selora.SRLoRAConfig, skip=("warmup_steps",))  # the run's train.warmup_steps
    schema = OmegaConf.to_container(OmegaConf.structured(launch_config.Config))
    assert schema["adapter"] == {"method": "selora", **adapter}
    assert schema["srlora"] == {"enabled": False, **srlora}
    written = OmegaConf.to_container(OmegaConf.load(launch_config.DEFAULTS))
    assert written["adapter"] == {"method": "selora"} and written["srlora"] == {"enabled": False}


def test_every_adapter_and_srlora_key_is_documented_in_its_library_class():
    """defaults.yaml leaves the adapter and SRLoRA keys to the library: every field of every registered method and
    of SRLoRAConfig is documented in the docstring of the class that declares it (``name: ...`` at a line's start)."""
    import inspect

    import selora
    for cls in (*selora.ADAPTER_METHODS.values(), selora.SRLoRAConfig):
        for f in dataclasses.fields(cls):
            owner = next(c for c in cls.__mro__ if f.name in vars(c).get("__annotations__", {}))
            lines = [line.strip() for line in inspect.getdoc(owner).splitlines()]
            assert any(line.startswith(f"{f.name}:") for line in lines), \
                f"{owner.__name__}.{f.name} is not documented in its docstring (a line '{f.name}: ...')"


def test_recipe_values_reach_the_library_configs():
    """Every adapter/SRLoRA key (svd_oversample included) arrives in the library's config unchanged."""
    cfg = launch_config.resolve("llama_selora_srlora", TINY_MODEL + ["srlora.svd_oversample=3", "adapter.dropout=0.1",
                                                                     "adapter.n_coefficients=5", "train.warmup_steps=4"])
    plan = validate(cfg)
    adapter, srlora = plan.adapter, plan.srlora
    assert type(adapter).__name__ == "SeLoRAConfig" and adapter.dropout == 0.1 and adapter.n_coefficients == 5
    assert adapter.target_modules == tuple(cfg.adapter.target_modules)
    assert srlora.svd_oversample == 3 and srlora.warmup_steps == 4 and srlora.schedule == "paper"
    assert adapter.init == "pissa"  # the recipe's choice, with the paper's schedule
    lora = validate(launch_config.resolve("llama_lora", TINY_MODEL)).adapter
    assert type(lora).__name__ == "LoRAConfig" and lora.dropout == 0.05  # the recipe's choice


def test_multi_process_launch_without_a_deepspeed_config_uses_zero2():
    cfg = launch_config.resolve("llama_selora")
    assert launch_config.default_deepspeed(cfg, 1) is None and cfg.deepspeed.config is None
    note = launch_config.default_deepspeed(cfg, 2)
    assert cfg.deepspeed.config == "zero2" and "using ZeRO-2" in note and len(note.splitlines()) == 1
    cfg = launch_config.resolve("llama_selora", ["deepspeed.config=zero3"])
    assert launch_config.default_deepspeed(cfg, 2) is None and cfg.deepspeed.config == "zero3"
