"""train.profile_steps: torch.profiler over a window of optimizer steps, tables written by rank 0 only."""
import pstats
import re

import pytest
import torch

from recipes.profiling import StepProfiler, profile_window


def run_steps(profiler: StepProfiler, steps: int, calls: list) -> None:
    x = torch.randn(64, 64)
    for step in range(1, steps + 1):
        profiler.before_step(step)
        calls.append(profiler.profiler is not None)  # profiling while this step runs?
        (x @ x).sum().item()
        profiler.after_step(step)


def test_profiles_exactly_the_window_and_writes_the_tables(tmp_path):
    calls = []
    run_steps(StepProfiler([2, 3], tmp_path, torch.device("cpu"), rank=0), 5, calls)
    assert calls == [False, True, True, False, False]
    ops = (tmp_path / "profile" / "ops.txt").read_text()
    assert ops.startswith("optimizer steps 2-3 (2)")
    assert "aten::mm" in ops and "## by self host time" in ops
    assert "aten::item: 1.0" in ops  # one .item() per step, counted among the waits for the device
    assert (tmp_path / "profile" / "trace.json").stat().st_size > 0


def python_step(x: torch.Tensor) -> float:
    return (x @ x).sum().item()


def test_the_python_profile_covers_the_window_and_names_the_functions(tmp_path):
    profiler = StepProfiler([2, 3], tmp_path, torch.device("cpu"), rank=0, python=True)
    x, inside = torch.randn(64, 64), []
    for step in range(1, 6):
        profiler.before_step(step)
        inside.append(profiler.profiler is not None)
        python_step(x)
        profiler.after_step(step)
    assert inside == [False, True, True, False, False]
    tables = (tmp_path / "profile" / "python.txt").read_text()
    assert tables.startswith("optimizer steps 2-3 (2)") and "## by own time" in tables
    # called once in each of the two profiled steps, not in the other three
    assert re.search(r"\n\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+ \S*test_profiling.py:\d+\(python_step\)", tables)
    assert not (tmp_path / "profile" / "ops.txt").exists()
    counts = {name: calls for (_, _, name), (_, calls, *_) in
              pstats.Stats(str(tmp_path / "profile" / "python.prof")).stats.items()}
    assert counts["python_step"] == 2


def test_other_ranks_and_an_empty_window_write_nothing(tmp_path):
    calls = []
    run_steps(StepProfiler([1, 2], tmp_path / "rank1", torch.device("cpu"), rank=1), 3, calls)
    run_steps(StepProfiler([], tmp_path / "none", torch.device("cpu"), rank=0), 3, calls)
    assert not any(calls) and not (tmp_path / "rank1").exists() and not (tmp_path / "none").exists()


@pytest.mark.parametrize("steps", [[3, 1], [0, 2], [4], ["a", 2]])
def test_a_malformed_window_names_the_key(steps):
    with pytest.raises(ValueError, match=r"train.profile_steps=.*give \[first, last\]"):
        profile_window(steps)
    assert profile_window([]) is None and profile_window([2, 2]) == (2, 2)


def test_a_python_profile_of_no_steps_names_both_keys():
    with pytest.raises(ValueError, match=r"train.profile_python=true .* give train.profile_steps=\[first, last\]"):
        profile_window([], python=True)
    assert profile_window([3, 4], python=True) == (3, 4)
