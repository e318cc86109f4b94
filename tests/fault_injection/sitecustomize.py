"""Test-only fault injection, loaded by Python at start-up when this folder is on PYTHONPATH.

SELORA_KILL_BEFORE_POINTER=N: SIGKILL this process at the moment it would move checkpoints/latest to step_N,
i.e. after every file of that checkpoint was written but before the checkpoint became valid — the worst
moment for a crash during a checkpoint write. With SELORA_KILL_STAMP=<path>, the time of the kill is written there.

SELORA_SIGNAL_ON_OPEN=<fnmatch pattern> (and SELORA_SIGNAL, default SIGTERM): the first time this process opens a
file for writing (from Python, or through torch.save) whose path matches, it sends itself that signal (e.g. while
it writes one file of a periodic checkpoint).

SELORA_DELAY_LOCK_RANK=N: the process of global rank N waits SELORA_DELAY_LOCK_SECONDS (default 15) before it
first takes a ``.lock`` file (recipes/shared_build.py's), so that another process takes it first.
"""
import fnmatch
import os
import signal
import sys
import time

_step = os.environ.get("SELORA_KILL_BEFORE_POINTER")
if _step:
    _replace = os.replace

    def _replace_or_die(src, dst, *args, **kwargs):
        if str(dst).endswith(os.path.join("checkpoints", "latest")) and open(src).read().strip() == f"step_{_step}":
            if os.environ.get("SELORA_KILL_STAMP"):
                with open(os.environ["SELORA_KILL_STAMP"], "w") as stamp:
                    stamp.write(f"{time.time()}\n")
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

_pattern = os.environ.get("SELORA_SIGNAL_ON_OPEN")
if _pattern:
    import builtins

    _pending = [getattr(signal, os.environ.get("SELORA_SIGNAL", "SIGTERM"))]

    def _signal_if_matching(path) -> None:
        if _pending and fnmatch.fnmatch(str(path), _pattern):
            os.kill(os.getpid(), _pending.pop())

    def _on_open(event, args):  # files Python opens for writing (json, text)
        if event == "open" and isinstance(args[0], str):
            path, mode, flags = args
            if any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR)):
                _signal_if_matching(path)

    sys.addaudithook(_on_open)
    _import = builtins.__import__

    def _import_and_wrap_torch_save(name, *args, **kwargs):  # torch.save opens its file in C++, unseen above
        module = _import(name, *args, **kwargs)
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "save") and not hasattr(torch.save, "_signals"):
            save = torch.save

            def _save(obj, f, *a, **k):
                _signal_if_matching(f)
                return save(obj, f, *a, **k)

            _save._signals = True
            torch.save = _save
            builtins.__import__ = _import
        return module

    builtins.__import__ = _import_and_wrap_torch_save
