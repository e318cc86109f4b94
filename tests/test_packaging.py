"""A plain (non-editable) install runs the README's default job from any folder: configs/ (recipes, presets,
DeepSpeed JSON, the default data and tokenizer) ships inside the installed recipes package (pyproject.toml,
recipes/config_files.py). One install and one tiny training run, about 10 s."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import SMALL_RUN

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.packaging
def test_a_plain_install_trains_the_default_recipe_from_another_folder(tmp_path):
    # The build runs without isolation (no index needed), so this environment's setuptools builds the wheel; it
    # has bdist_wheel built in from 70.1 (torch 2.13 itself requires >= 77).
    pytest.importorskip("setuptools", minversion="70.1")
    # A copy of the tree, so the in-tree build (build/, *.egg-info) neither writes into the repository nor reuses
    # stale files from an earlier build there.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", "outputs",
                                                                "__pycache__", ".pytest_cache", "docs", "bench"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    env_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    # torch, transformers, deepspeed ... from this interpreter's environment; a path listed in a .pth file is not
    # itself scanned for .pth files, so an editable install of selora there stays out of sight.
    (env_site / "base_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["DS_ACCELERATOR"] = "cpu"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", str(source)], check=True, env=env, capture_output=True)
    shutil.rmtree(source)  # nothing may be read from the source tree any more

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([python, "-c", "import launch, recipes, selora; print(recipes.__file__)"], cwd=work,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert Path(where.strip()).is_relative_to(env_site)
    run = subprocess.run([python, "-m", "launch.train", "--recipe", "llama_selora", *SMALL_RUN, "train.max_steps=2",
                          "train.save_every=0", "train.sample_prompts=[]"], cwd=work, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    adapter = work / "runs" / "llama_selora" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    losses = [line for line in (work / "runs" / "llama_selora" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2, losses
