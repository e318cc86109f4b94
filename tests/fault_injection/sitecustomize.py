"""Test-only fault injection, loaded by Python at start-up when this folder is on PYTHONPATH.

SELORA_KILL_BEFORE_POINTER=N: SIGKILL this process at the moment it would move checkpoints/latest to step_N,
i.e. after every file of that checkpoint was written but before the checkpoint became valid — the worst
moment for a crash during a checkpoint write.

SELORA_DELAY_LOCK_RANK=N: the process of global rank N waits SELORA_DELAY_LOCK_SECONDS (default 15) before it
first takes a ``.lock`` file (recipes/shared_build.py's), so that another process takes it first.
"""
import os
import signal

_step = os.environ.get("SELORA_KILL_BEFORE_POINTER")
if _step:
    _replace = os.replace

    def _replace_or_die(src, dst, *args, **kwargs):
        if str(dst).endswith(os.path.join("checkpoints", "latest")) and open(src).read().strip() == f"step_{_step}":
            os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die

_late_rank = os.environ.get("SELORA_DELAY_LOCK_RANK")
if _late_rank is not None and os.environ.get("RANK") == _late_rank:
    import fcntl
    import time

    _flock, _delayed = fcntl.flock, []

    def _late_flock(handle, operation):
        if not _delayed and str(getattr(handle, "name", "")).endswith(".lock") and operation == fcntl.LOCK_EX:
            _delayed.append(True)
            time.sleep(float(os.environ.get("SELORA_DELAY_LOCK_SECONDS", "15")))
        return _flock(handle, operation)

    fcntl.flock = _late_flock
