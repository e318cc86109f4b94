"""launch/config.py and launch/train.py: resolution, typed overrides, and one-line errors for bad input."""
import subprocess
import sys

import pytest

from launch import config as launch_config
from launch.config import ConfigError
from launch.train import main

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
    if cfg.srlora.enabled:
        assert cfg.srlora.start_step <= cfg.train.max_steps  # recompositions happen inside the run


def test_misspelled_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lerning_rate'.*'train.learning_rate'"):
        launch_config.resolve("llama_selora", ["train.lerning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"'adaptr'.*did you mean"):
        launch_config.resolve("llama_selora", ["adaptr.r=3"])


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


def run_main(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv, expected", [
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--recipe", "llama_selora", "train.lerning_rate=1"], "did you mean 'train.learning_rate'"),
    (["--recipe", "llama_selora", "adapter.r=two"], "adapter.r='two' has the wrong type"),
    (["--recipe", "llama_selora", "model.path=/nonexistent/llama"], "model.path='/nonexistent/llama' is not a directory"),
    (["--recipe", "llama_selora", "data.train_files=[missing.jsonl]"], "'missing.jsonl' not found"),
    (["--recipe", "llama_selora", "adapter.spectral_ratio=1.5"], "spectral_ratio=1.5"),
    (["--recipe", "llama_srlora", "srlora.start_step=500"], "end_step=50 is before start_step=500"),
    (["--recipe", "llama_srlora", "srlora.start_step=500", "srlora.end_step=600"], "never fires within 60 training steps"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, expected):
    code, err = run_main(capsys, *argv, f"train.output_dir={tmp_path}")
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_malformed_and_empty_data_and_short_max_length(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n')
    code, err = run_main(capsys, "--recipe", "llama_selora", f"data.train_files=[{bad}]", f"train.output_dir={tmp_path}")
    assert code == 2 and "bad.jsonl line 2: not valid JSON" in err[0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run_main(capsys, "--recipe", "llama_selora", f"data.train_files=[{empty}]", f"train.output_dir={tmp_path}")
    assert code == 2 and "holds no records" in err[0]
    code, err = run_main(capsys, "--recipe", "llama_selora", "data.max_length=8", f"train.output_dir={tmp_path}")
    assert code == 2 and "leaves no room for the answer" in err[0]


def test_4bit_recipe_without_backend_fails_before_training(capsys, tmp_path, monkeypatch):
    from selora import quant
    monkeypatch.setattr(quant, "quantization_available", lambda kind, device: "no CUDA and no CPU kernels")
    code, err = run_main(capsys, "--recipe", "qlora_selora", f"train.output_dir={tmp_path}")
    assert code == 2 and "model.quantization=4bit cannot run on this machine: no CUDA and no CPU kernels" in err[0]
    assert not (tmp_path / "metrics.jsonl").exists()
