"""Every bench/ script's CPU smoke run, in this process through its main(argv): the tables have the rows they
should, the numbers are finite and positive, ratios are against the same run's baseline, and the results land in
the dated files bench/common.py names."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402


def dated(out: Path, question: str, suffix: str = ".json") -> Path:
    path = out / f"{question}_{time.strftime('%Y-%m-%d')}{suffix}"
    assert path.is_file(), sorted(p.name for p in out.iterdir())
    return path


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_results_are_dated_and_carry_device_and_commit(tmp_path):
    path = common.write_results(tmp_path, "question", "# table\n", {"rows": [1]}, "cpu")
    saved = json.loads(path.read_text())
    assert path == dated(tmp_path, "question") and saved["rows"] == [1] and saved["device"] == "cpu"
    assert saved["date"] == time.strftime("%Y-%m-%d") and saved["commit"] and path.with_suffix(".md").is_file()


def test_median_range_and_timing():
    assert common.median_range([3, 1, 2]) == (2, 1, 3)
    device = common.pick_device(cpu=True)[0]
    assert positive(common.time_ms(lambda: sum(range(1000)), device, repeats=3))


def test_recipe_vs_peft_smoke(tmp_path):
    import recipe_vs_peft
    recipe_vs_peft.main(["--smoke", "--rows", "recipe plain LoRA", "--out", str(tmp_path)])
    document = json.loads(dated(tmp_path, "recipe_vs_peft_smoke").read_text())
    rows = {row["name"]: row for row in document["rows"]}
    assert list(rows) == ["plain PEFT loop", "HF Trainer + PEFT", "recipe plain LoRA"]
    loop, trainer, recipe = rows.values()
    assert "error" not in recipe and all(positive(row["tokens_per_s"]) for row in rows.values())
    assert loop["ratio_to_peft_loop"] == 1.0 and trainer["ratio_to_trainer"] == 1.0
    assert recipe["ratio_to_peft_loop"] == pytest.approx(recipe["tokens_per_s"] / recipe["peft_loop_tokens_per_s"])
    assert recipe["ratio_to_trainer"] == pytest.approx(recipe["tokens_per_s"] / trainer["tokens_per_s"])
    table = dated(tmp_path, "recipe_vs_peft_smoke", ".md").read_text()
    assert table.count("| tiny_llama 2x256 |") == 3


def test_bases_speed_smoke(tmp_path):
    import bases_speed
    rows = bases_speed.main(["--smoke", "--out", str(tmp_path)])
    timed = [row for row in rows if "fwd_bwd_ms" in row]
    assert {row["candidate"] for row in timed} >= {f"selora {name}" for name in bases_speed.BASES}
    assert len({(row["rank"], row["width"], row["factors"]) for row in timed}) == 2 * 2 * 2
    assert all(positive(row["fwd_bwd_ms"]) for row in timed)
    assert all(row["max_diff_vs_selora_haar"] < 1e-4 for row in timed if "max_diff_vs_selora_haar" in row)
    assert dated(tmp_path, "bases_speed", ".md").read_text().count("| selora haar |") == 8


def test_svd_init_smoke(tmp_path):
    import svd_init
    results = svd_init.main(["--smoke", "--out", str(tmp_path)])
    assert results["matrices"] == 14 and results["full_scheduled_matrices"] == 7
    assert all(positive(results[key]) for key in ("randomized_s", "full_s", "full_extrapolated_s_1gpu"))
    assert results["randomized_max_rel_singular_value_error"] < 0.1
    assert json.loads(dated(tmp_path, "svd_init_1gpu").read_text())["matrices"] == 14


def test_data_prepare_smoke(tmp_path):
    """A few hundred records: a cold start tokenizes, a warm one reads the cache."""
    import data_prepare
    result = data_prepare.main(["--records", "300", "--in-process", "--out", str(tmp_path)])
    saved = json.loads(dated(tmp_path, "data_prepare").read_text())
    assert {key: saved[key] for key in result} == result and result["records"] == 300 and result["packed_rows"] > 0
    assert result["tokens"] > 300 * 20 and result["first_start_peak_rss_mb"] > 0
    assert "300 synthetic short ShareGPT" in dated(tmp_path, "data_prepare", ".md").read_text()


def test_stop_checkpoint_time_smoke(tmp_path):
    """A tiny adapter, one SIGTERM, a checkpoint, exit 75, inside the grace period."""
    import stop_checkpoint_time
    report = stop_checkpoint_time.main(["--smoke", "--rounds", "1", "--step-seconds", "0.2", "--out", str(tmp_path)])
    (round_,) = report["rounds"]
    assert round_["exit_status"] == 75 and round_["checkpoint_bytes"] > 0
    assert 0 < round_["checkpoint_s"] <= round_["signal_to_exit_s"] < 25
    assert not list(tmp_path.iterdir())  # a smoke run writes no result


def test_setup_time_smoke(tmp_path):
    import setup_time
    setup_time.main(["--smoke", "--out", str(tmp_path)])
    document = json.loads(dated(tmp_path, "setup_time_smoke").read_text())
    (row,) = document["rows"]
    assert row["name"] == "tiny_llama bf16 from a local checkpoint" and "error" not in row
    assert positive(row["seconds"]) and row["parameters"] == 1_444_480 and positive(document["checkpoint_write_s"])
    assert "| tiny_llama bf16 from a local checkpoint |" in dated(tmp_path, "setup_time_smoke", ".md").read_text()


def test_row_diagnosis_smoke(tmp_path, capsys):
    import row_diagnosis
    row_diagnosis.main(["--rows", "recipe plain LoRA (padding-free eager)", "--shape", "tiny_llama", "--batch", "2",
                        "--rank", "8", "--steps", "3", "--warmup", "2", "--profile", "3,3", "--out", str(tmp_path)])
    kept = tmp_path / "recipe_plain_LoRA_padding_free_eager"
    assert "by self host time" in (kept / "ops.txt").read_text() and (kept / "metrics.jsonl").is_file()
    summary = capsys.readouterr().out
    assert "== recipe plain LoRA (padding-free eager): exit 0; recompiles 0, graph breaks 0" in summary
    assert row_diagnosis.summarise("Recompiling function forward in x.py\n  triggered by the following guard "
                                   "failure(s):\nGraph break in user code at y.py:3")["graph break"] == 1


def test_host_calls_smoke(tmp_path):
    """Python calls per optimizer step, counted: one-rank ZeRO-3 as the engine runs it makes far fewer than with
    DeepSpeed's own path (the fetch-hooks row), most of whose extra calls are DeepSpeed's."""
    import host_calls
    rows = host_calls.main(["--rows", "recipe ZeRO-3 LoRA (padding-free),recipe ZeRO-3 LoRA (padding-free fetch hooks)",
                            "--shape", "tiny_llama", "--rank", "8", "--steps", "2", "--warmup", "2",
                            "--profile", "3,3", "--out", str(tmp_path)])
    engine_path, deepspeed_path = rows
    assert 0 < engine_path["deepspeed_calls_per_step"] < engine_path["calls_per_step"]
    assert deepspeed_path["calls_per_step"] > 1.5 * engine_path["calls_per_step"]
    assert deepspeed_path["deepspeed_calls_per_step"] > 3 * engine_path["deepspeed_calls_per_step"]
    assert deepspeed_path["most_added"] and all(added > 0 for _, added in deepspeed_path["most_added"])
    assert json.loads(dated(tmp_path, "host_calls").read_text())["rows"][1]["row"] == deepspeed_path["row"]


def test_a_failed_row_reports_the_recipes_own_failure_line():
    """A failed recipe row names what failed (the recipe's own line), not a library's hint printed after it."""
    import recipe_vs_peft
    output = ("train:   0%|\nrank 0: failed after optimizer step 0 (TorchRuntimeError: RuntimeError when making fake "
              "tensor call); checkpoints/latest ...\nTraceback (most recent call last):\n  File ...\n"
              "[rank0]: Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n")
    assert recipe_vs_peft.failure_line(output).startswith("rank 0: failed after optimizer step 0 (TorchRuntimeError")
    assert recipe_vs_peft.failure_line("Error: data.max_length=128 leaves no room\n") == \
        "Error: data.max_length=128 leaves no room"
