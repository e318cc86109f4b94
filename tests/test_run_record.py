"""The run's record (recipes/run_record.py): output_dir/config.yaml is the resolved config as it ran, and
`launch/train.py --recipe <that file>` reruns it (same resolved config, same first losses); run_info.json says
with what it ran."""
import json
import sys

from omegaconf import OmegaConf

from launch.config import resolve
from launch.train import main
from recipes import run_record

from conftest import SMALL_RUN


def first_losses(output_dir):
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_saved_config_reruns_the_same_run(finished_run, tmp_path):
    """conftest's finished_run (4 steps of llama_selora) rerun from its config.yaml alone."""
    first, second = finished_run, tmp_path / "second"
    saved = first / run_record.CONFIG_FILE
    cfg = resolve("llama_selora", SMALL_RUN + ["train.max_steps=4", "train.save_every=2",
                                                f"train.output_dir={first}"])  # as conftest ran it
    assert OmegaConf.to_container(OmegaConf.load(saved)) == OmegaConf.to_container(cfg)
    assert resolve(str(saved)) == cfg  # the file alone resolves to exactly what ran

    rerun = resolve(str(saved), [f"train.output_dir={second}"])
    expected = OmegaConf.to_container(cfg)
    expected["train"]["output_dir"] = str(second)
    assert OmegaConf.to_container(rerun) == expected

    assert main(["--recipe", str(saved), f"train.output_dir={second}"]) == 0
    assert len(first_losses(first)) == 4
    assert first_losses(second) == first_losses(first)
    assert OmegaConf.to_container(OmegaConf.load(second / run_record.CONFIG_FILE)) == expected

    info = json.loads((first / run_record.RUN_INFO_FILE).read_text())
    import torch
    import transformers
    assert info["packages"]["torch"] == torch.__version__ and info["packages"]["transformers"] == transformers.__version__
    assert set(info["packages"]) == set(run_record.PACKAGES)
    assert info["world_size"] == 1 and info["resumed_from"] is None and info["command"][0] == sys.executable
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["source"] is None or (len(info["source"]["commit"]) == 40 and isinstance(info["source"]["dirty"], bool))
    assert info["started"].endswith("+00:00")


def test_the_source_commit_is_the_checkout_s_own_not_an_enclosing_repository_s(tmp_path):
    """A copy installed into a virtual environment inside some project's checkout records no commit: that
    project's HEAD is not the source that ran."""
    import subprocess
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    installed = tmp_path / ".venv" / "lib" / "site-packages"
    installed.mkdir(parents=True)
    assert run_record.source_commit(installed) is None
    own = run_record.source_commit(tmp_path)
    assert len(own["commit"]) == 40 and own["dirty"] is False
    if (run_record.SOURCE / ".git").exists():  # the tests run from a clone
        assert run_record.source_commit(run_record.SOURCE)["commit"] == subprocess.run(
            ["git", "-C", str(run_record.SOURCE), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
