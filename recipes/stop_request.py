"""A request to stop (a signal, or a stop file that a batch script creates) turned into "stop after this optimizer
step", the same step on every rank.

    stop = StopRequest(["SIGTERM", "SIGUSR1"], grace_s=25, request_file=os.environ.get(STOP_FILE_ENV))
    stop.install()
    ... after each optimizer step:  if stop.agreed(): save a checkpoint, leave the loop ...

`agreed` is one small all-reduce (MAX of one flag), so no rank is ever left alone in a collective. The first
signal only sets the flag and starts the grace deadline; a second signal (more than DUPLICATE_WINDOW_S after the
first), or the deadline, ends the process at once with ABORTED: whatever checkpoint is being written then never
becomes `latest` (recipes/checkpoint.py moves that pointer last). Signals are read by a thread from the
interpreter's wake-up pipe, so the second signal and the deadline work even while the main thread is blocked
inside a collective (where Python signal handlers do not run).
"""
from __future__ import annotations

import functools
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

STOPPED = 75  # exit status: stopped on request at a step boundary with a checkpoint (EX_TEMPFAIL: try again)
ABORTED = 76  # exit status: a second signal or the grace deadline ended the run before the stop finished
# The same SIGTERM often arrives twice within milliseconds: from SLURM to every process of the step, and again
# from torchrun, which forwards it to its workers. Only a signal later than this counts as a second one.
DUPLICATE_WINDOW_S = 2.0
STOP_FILE_ENV = "SELORA_STOP_FILE"  # a path: the run stops after the step during which it appears
RESUME_FILE_ENV = "SELORA_RESUME_FILE"  # a path: written when the run stopped with a checkpoint and steps left
CATCHABLE = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


_INSTALLED: list["StopRequest"] = []


def uninstalled_after(function):
    """Decorator: every StopRequest installed during a call is uninstalled when it returns or raises (a caller in
    the same process, e.g. a test, gets its signal handlers back)."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            while _INSTALLED:
                _INSTALLED.pop().uninstall()
    return call


class StopRequest:
    """Polled by the training loop; knows nothing of checkpoints."""

    def __init__(self, signals: list[str], grace_s: float, request_file: str | None = None, rank: int = 0,
                 device=None):
        self.signals = [getattr(signal, name) for name in signals]
        self.device = device  # where the agreement's one-number all-reduce runs (NCCL needs a CUDA tensor)
        self.grace_s = float(grace_s)
        self.request_file = Path(request_file) if request_file else None
        self.rank = rank
        self.reason: str | None = None  # why this rank asked to stop ("SIGTERM", "stop file ...")
        self.first_signal_at: float | None = None
        self._previous: dict = {}
        self._wakeup = None

    # ----- signals ------------------------------------------------------------------------------------------
    def install(self) -> "StopRequest":
        """Catch the stop signals (main thread only; elsewhere signals keep their default action)."""
        if threading.current_thread() is not threading.main_thread() or not self.signals:
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._wakeup = (read_fd, write_fd, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False))
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, lambda *_: None)  # the watcher thread does the work
        threading.Thread(target=self._watch, args=(read_fd,), name="stop-request", daemon=True).start()
        _INSTALLED.append(self)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._wakeup is not None:
            read_fd, write_fd, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # the watcher sees end of file and returns
            self._wakeup = None

    def _watch(self, read_fd: int) -> None:
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([read_fd], [], [], timeout)[0]:
                self._abort(f"the stop did not finish within train.stop_grace_s={self.grace_s:g} s of "
                            f"{self.reason}")
            data = os.read(read_fd, 64)
            if not data:
                os.close(read_fd)
                return
            for signum in data:
                if signum not in self.signals:
                    continue
                now = time.monotonic()
                if self.first_signal_at is None:
                    self.first_signal_at, self.reason = now, signal.Signals(signum).name
                    deadline = now + self.grace_s
                elif now - self.first_signal_at > DUPLICATE_WINDOW_S:
                    self._abort(f"a second signal ({signal.Signals(signum).name}) after {self.reason}")

    def _abort(self, why: str) -> None:
        print(f"rank {self.rank}: {why}: exiting now (status {ABORTED}) without finishing a checkpoint; "
              "checkpoints/latest still names the last complete one", file=sys.stderr, flush=True)
        os._exit(ABORTED)

    # ----- polling --------------------------------------------------------------------------------------------
    def requested_here(self) -> bool:
        """Whether this rank was asked to stop (a signal, or the stop file exists)."""
        if self.reason is None and self.request_file is not None and self.request_file.exists():
            self.reason = f"stop file {self.request_file}"
        return self.reason is not None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop: the same answer on every rank (a collective; every rank calls)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.requested_here())], device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.requested_here()  # the stop file may have appeared since this rank looked
        return bool(flag.item())


class Stopped(Exception):
    """The run stopped on request at a step boundary; the message says where and how to continue."""

    def __init__(self, step: int, total_steps: int, checkpoint_dir: Path | None, why: str | None):
        self.step, self.total_steps, self.checkpoint_dir = step, total_steps, checkpoint_dir
        cause = f" ({why})" if why else " (another rank was asked)"
        if checkpoint_dir is None:
            message = (f"stopped on request{cause} before the first step; nothing was saved: rerun the same command "
                       "to start")
        else:
            message = (f"stopped on request{cause} after step {step} of {total_steps}; checkpoint {checkpoint_dir}: "
                       "rerun the same command (train.resume=auto) to continue")
        super().__init__(message)

    def leave_resume_note(self, path: str | None) -> None:
        """Write ``path`` (for the batch script: requeue me) when there is a checkpoint to continue from."""
        if path and self.checkpoint_dir is not None:
            Path(path).write_text(f"{self.checkpoint_dir}\n")
