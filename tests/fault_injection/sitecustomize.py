"""Test-only fault injection, loaded by Python at start-up when this folder is on PYTHONPATH.

SELORA_KILL_BEFORE_POINTER=N: SIGKILL this process at the moment it would move checkpoints/latest to step_N,
i.e. after every file of that checkpoint was written but before the checkpoint became valid — the worst
moment for a crash during a checkpoint write.
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
