"""torch.profiler over a few optimizer steps of a run (train.profile_steps=[first, last]): where the time of a step
goes on the host and on the device, per operator, written to output_dir/profile/ by rank 0.

    python launch/train.py --recipe llama_lora train.profile_steps=[10,12]

profile/ops.txt holds two tables (operators by self device time, and by self host time) and the number of calls
that make the host wait for the device (synchronisations, blocking copies, cudaMalloc); profile/trace.json opens in
chrome://tracing or Perfetto. Profiling slows the profiled steps: their throughput is not representative, and
train.time_breakdown should be off when reading it.

With train.profile_python=true the same steps run under Python's cProfile instead, and profile/python.txt lists the
Python functions by own and by cumulative time: for a host-bound step whose time goes to Python (hooks of an
engine, the loop's bookkeeping) rather than to operators. profile/python.prof holds every function's counts
(pstats, snakeviz), to compare two runs function by function.
"""
from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# Host-side calls that wait for the device (or for the whole device): what turns a step host-bound into serial.
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMalloc",
         "cudaFree", "cudaHostAlloc", "aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def profile_window(steps, python: bool = False) -> tuple[int, int] | None:
    """train.profile_steps as (first, last), None when empty; a ValueError naming the key when malformed, or when
    ``python`` (train.profile_python) asks for a profile of no steps."""
    steps = list(steps or [])
    if python and not steps:
        raise ValueError("train.profile_python=true profiles the steps of train.profile_steps, which is []; "
                         "give train.profile_steps=[first, last] too")
    try:
        first, last = (int(s) for s in steps) if steps else (None, None)
    except (TypeError, ValueError):
        first = last = 0
    if steps and not 1 <= first <= last:
        raise ValueError(f"train.profile_steps={steps}: give [first, last] optimizer steps with 1 <= first <= last, "
                         "or [] for no profile")
    return (first, last) if steps else None


class StepProfiler:
    """Started before optimizer step ``first`` and stopped after step ``last`` (1-based, inclusive)."""

    def __init__(self, steps, output_dir: str | Path, device: torch.device, rank: int, trace: bool = True,
                 python: bool = False):
        window = profile_window(steps, python)
        self.first, self.last = window or (None, None)
        self.enabled = window is not None and rank == 0
        self.out = Path(output_dir) / "profile"
        self.device, self.trace, self.python = device, trace, python
        self.profiler = None

    def before_step(self, step: int) -> None:
        """Call with the number the coming optimizer step will have."""
        if not self.enabled or step != self.first or self.profiler is not None:
            return
        if self.python:
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        else:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, record_shapes=False)
            self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        if self.profiler is None or step < self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.python:
            self.profiler.disable()
            self.write_python(self.profiler, self.last - self.first + 1)
        else:
            self.profiler.__exit__(None, None, None)
            self.write(self.profiler, self.last - self.first + 1)
        self.profiler = None
        self.enabled = False

    def write(self, profiler, steps: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        averages = profiler.key_averages()
        lines = [f"optimizer steps {self.first}-{self.last} ({steps}); times are totals over them", ""]
        if self.device.type == "cuda":
            lines += ["## by self device time", averages.table(sort_by="self_device_time_total", row_limit=30), ""]
        lines += ["## by self host time", averages.table(sort_by="self_cpu_time_total", row_limit=30), ""]
        waits = {event.key: event.count for event in averages if any(event.key.startswith(w) for w in WAITS)}
        lines += ["## calls that wait for the device, per step"]
        lines += [f"{key}: {count / steps:.1f}" for key, count in sorted(waits.items())] or ["none"]
        launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        lines.append(f"kernel launches per step: {launches / steps:.0f}")
        (self.out / "ops.txt").write_text("\n".join(lines) + "\n")
        if self.trace:
            profiler.export_chrome_trace(str(self.out / "trace.json"))

    def write_python(self, profiler: cProfile.Profile, steps: int, rows: int = 40) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        text.write(f"optimizer steps {self.first}-{self.last} ({steps}); cProfile's times are totals over them\n")
        stats = pstats.Stats(profiler, stream=text)
        for order, label in (("tottime", "own"), ("cumulative", "cumulative")):
            text.write(f"\n## by {label} time\n")
            stats.sort_stats(order).print_stats(rows)
        (self.out / "python.txt").write_text(text.getvalue())
        profiler.dump_stats(self.out / "python.prof")  # every function, for pstats, snakeviz or a diff of two runs
