"""recipes/validate.py's RunPlan: every value the run resolves from the config (dtype, quantization backend, padding
multiple, attention, world size, DeepSpeed config) is worked out once per start, and recipes/finetune.py hands the
resolved value down instead of model loading, the engine or ZeRO-3's init context resolving it again."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from launch.config import resolve
from recipes import data, engine, finetune, modeling, packed_attention  # all imported before any wrapping
from recipes.validate import RunPlan, validate

from conftest import SMALL_RUN, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", finetune.OWN_GROUP_ENV)
# (module that defines it, name): each must run once per start (the DeepSpeed ones not at all without DeepSpeed).
RESOLUTIONS = [(modeling, "check_quantization_backend"), (modeling, "resolve_precision"), (modeling, "resolve_dtype"),
               (data, "pad_multiple"), (packed_attention, "resolve_attention"), (engine, "check_world_size"),
               (engine, "deepspeed_json"), (engine, "planned_deepspeed_config")]


def count_calls(monkeypatch) -> dict[str, list]:
    """Wrap each of RESOLUTIONS wherever it is bound (its module and every recipes module that imported it by
    name), so a call by any path is counted; returns {name: [call, ...]}."""
    calls = {}
    for home, name in RESOLUTIONS:
        original = getattr(home, name)
        calls[name] = []

        def counted(*args, _original=original, _calls=calls[name], **kwargs):
            _calls.append(args)
            return _original(*args, **kwargs)

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("recipes") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counted)
    return calls


def test_validate_returns_the_plan_for_the_device():
    cfg = resolve("llama_srlora", TINY_MODEL + ["model.dtype=float16", "data.pad_to_multiple_of=auto",
                                                "data.padding_free=true", "deepspeed.config=zero2"])
    cpu = validate(cfg, torch.device("cpu"))
    assert isinstance(cpu, RunPlan) and cpu.device == torch.device("cpu") and cpu.world_size == 1
    assert cpu.adapter.r == cfg.adapter.r and cpu.srlora.warmup_steps == cfg.train.warmup_steps
    assert cpu.precision.dtype == torch.float16 and cpu.precision.loss_scaling and cpu.precision.quantization == "none"
    assert (cpu.pad_multiple, cpu.attention) == (1, "sdpa")
    assert cpu.deepspeed["fp16"]["enabled"] is True  # float16 computes with DeepSpeed's loss scale
    assert cpu.deepspeed["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    # The ZeRO bucket sizes follow the model's width: the engine fills them once the model is there.
    assert cpu.deepspeed["zero_optimization"].get("reduce_bucket_size", "auto") == "auto"
    assert engine.sized_for_model(cpu.deepspeed, 64)["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    # On a GPU (only the device's type is read: nothing touches CUDA here) the device-dependent values differ.
    gpu = validate(cfg, torch.device("cuda", 0))
    assert (gpu.pad_multiple, gpu.attention) == (64, packed_attention.VARLEN)
    plain = validate(resolve("llama_selora", TINY_MODEL), torch.device("cuda", 0))
    assert plain.deepspeed is None and plain.srlora is None and plain.precision.dtype == torch.bfloat16


def test_each_resolution_runs_once_per_start(tmp_path, monkeypatch):
    """A plain single-process run (the run's whole path: validate, model loading, attention, engine)."""
    calls = count_calls(monkeypatch)
    finetune_run(["train.max_steps=2", f"train.output_dir={tmp_path}"])
    counts = {name: len(c) for name, c in calls.items()}
    assert counts == {"check_quantization_backend": 1, "resolve_precision": 1, "resolve_dtype": 1, "pad_multiple": 1,
                      "resolve_attention": 1, "check_world_size": 1, "deepspeed_json": 0,
                      "planned_deepspeed_config": 0}


def test_each_resolution_runs_once_per_start_under_deepspeed_zero3(tmp_path):
    """ZeRO-3 with its init context, one process without a launcher (which makes a one-process gloo group, so in a
    child process): the DeepSpeed config is read and filled once, for validate, the init context and the engine.
    launch/train.py then destroys the group and takes back the launcher variables it set (a gloo group left to the
    interpreter's exit can abort it: pytorch/pytorch#190489)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "DS_ACCELERATOR": "cpu"}
    for key in LAUNCHER_ENV:
        env.pop(key, None)
    result = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts == {"check_quantization_backend": 1, "resolve_precision": 1, "resolve_dtype": 1, "pad_multiple": 1,
                      "resolve_attention": 1, "check_world_size": 1, "deepspeed_json": 1,
                      "planned_deepspeed_config": 1, "zero3_init": 1, "exit": 0, "left_behind": [],
                      "mlflow_loaded": False, "mlflow_importable": importlib.util.find_spec("mlflow") is not None}


def finetune_run(overrides: list[str], recipe: str = "llama_selora") -> dict:
    return finetune.run(resolve(recipe, SMALL_RUN + ["train.save_every=0", "train.export_peft=false", *overrides]))


if __name__ == "__main__":  # the ZeRO-3 run of the test above, in its own process
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        found = count_calls(patch)
        zero3 = []
        original = engine._zero3_init
        patch.setattr(engine, "_zero3_init", lambda config: zero3.append(config) or original(config))
        from launch.train import main
        code = main(["--recipe", "llama_selora", *SMALL_RUN, "train.save_every=0", "train.export_peft=false",
                     "train.max_steps=2", f"train.output_dir={sys.argv[1]}", "deepspeed.config=zero3",
                     "deepspeed.zero3_init=true"])
    # launch/train.py leaves the one-process group it made: nothing for the interpreter's exit to tear down.
    left_behind = [key for key in LAUNCHER_ENV if key in os.environ] + ["group"] * torch.distributed.is_initialized()
    # DeepSpeed was imported without MLflow (recipes/engine.import_deepspeed), which can still be imported after it
    mlflow_loaded = "mlflow" in sys.modules
    try:
        import mlflow  # noqa: F401
        mlflow_importable = True
    except ImportError:
        mlflow_importable = False
    print(json.dumps({**{name: len(c) for name, c in found.items()}, "zero3_init": len(zero3), "exit": code,
                      "left_behind": left_behind, "mlflow_loaded": mlflow_loaded,
                      "mlflow_importable": mlflow_importable}))
