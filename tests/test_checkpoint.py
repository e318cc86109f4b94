"""recipes/checkpoint.py: manifests with sha256, resume that refuses (or, under resume=auto, steps back from) a
corrupt checkpoint, train.overwrite, settings recorded and compared, and folders made with the user's umask."""
import json
import os
import shutil

import pytest

from launch.config import resolve
from recipes import checkpoint, finetune, resume
from recipes.checkpoint import CheckpointError

from conftest import SMALL_RUN


def run(output_dir, *overrides):
    return finetune.run(resolve("llama_selora", SMALL_RUN + ["train.export_peft=false",
                                                             f"train.output_dir={output_dir}", *overrides]))


def losses(output_dir):
    return {l["step"]: l["loss"] for l in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture
def finished(finished_run):
    """A finished 4-step run with checkpoints at steps 2 and 4 (conftest; copy it before changing it)."""
    return finished_run


def test_manifest_lists_every_file_with_size_and_sha256(finished):
    step_dir = finished / "checkpoints" / "step_4"
    record = json.loads((step_dir / "trainer_state.json").read_text())
    on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()} - {"trainer_state.json"}
    assert set(record["files"]) == on_disk and on_disk
    for name, entry in record["files"].items():
        assert entry == {"size": (step_dir / name).stat().st_size, "sha256": checkpoint.sha256(step_dir / name)}
    assert record["settings"]["model"] == {"preset": "tiny_llama", "seed": 0, "quantization": "none"}
    assert record["settings"]["adapter"]["method"] == "selora" and "micro_batches" not in record


def corrupt_same_size(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_file_of_the_same_size_names_the_file_and_the_older_checkpoint(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    step_4, step_2 = out / "checkpoints" / "step_4", out / "checkpoints" / "step_2"
    weights = step_4 / "adapter" / "adapter_model.safetensors"
    size = weights.stat().st_size
    corrupt_same_size(weights)
    assert weights.stat().st_size == size
    with pytest.raises(CheckpointError) as error:
        resume.find_checkpoint(out, str(step_4))
    message = str(error.value)
    assert str(weights) in message and "sha256" in message and f"train.resume={step_2}" in message
    # resume=auto uses the older checkpoint after one warning line and trains on from its step.
    capsys.readouterr()
    result = run(out, "train.max_steps=6", "train.save_every=2")
    printed = capsys.readouterr().out.splitlines()
    warnings = [line for line in printed if line.startswith("warning:")]
    assert len(warnings) == 1 and str(weights) in warnings[0] and str(step_2) in warnings[0]
    assert any(f"resumed from {step_2} at step 2" in line for line in printed)
    assert result["step"] == 6 and sorted(losses(out)) == list(range(1, 7))
    assert losses(out)[2] == losses(finished)[2]  # lines up to the checkpoint's step are kept


def test_overwrite_replaces_a_previous_run_and_only_its_files(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="train.overwrite=true"):
        run(out, "train.max_steps=2", "train.resume=never")
    run(out, "train.max_steps=2", "train.save_every=1", "train.resume=never", "train.overwrite=true")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_1", "step_2"]
    assert sorted(losses(out)) == [1, 2] and (out / "notes.txt").read_text() == "mine"


def test_setting_differences_name_every_one():
    recorded = {"model": {"preset": "tiny_llama", "quantization": "none"}, "adapter": {"r": 8, "use_dora": False}}
    now = {"model": {"preset": "tiny_llama", "quantization": "4bit", "bnb_4bit_quant_type": "nf4"},
           "adapter": {"r": 16, "use_dora": False}}
    assert resume.setting_differences(recorded, now) == [
        "adapter.r=8 (now 16)", "model.bnb_4bit_quant_type=unset (now 'nf4')", "model.quantization='none' (now '4bit')"]


def test_a_setting_added_after_the_checkpoint_is_no_difference_at_its_default():
    # srlora.schedule and its keys came after earlier checkpoints were written; at their defaults they train
    # exactly as those checkpoints did, so a resume is not refused for them.
    recorded = {"srlora": {"enabled": True, "start_step": 10}}
    now = {"srlora": {"enabled": True, "start_step": 10, "schedule": "fixed", "target_rank": None}}
    assert resume.setting_differences(recorded, now, resume.library_defaults()) == []
    assert resume.setting_differences(recorded, {"srlora": {**now["srlora"], "schedule": "paper"}},
                                          resume.library_defaults()) == ["srlora.schedule=unset (now 'paper')"]


def test_output_folders_get_the_users_umask(finished):
    mode = 0o777 & ~current_umask()
    for folder in (finished / "adapter", finished / "peft_adapter", finished / "checkpoints" / "step_4" / "adapter",
                   finished / "checkpoints"):
        assert folder.stat().st_mode & 0o777 == mode, (folder, oct(folder.stat().st_mode))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
