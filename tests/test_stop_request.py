"""recipes/stop_request.py on one process: a signal or the stop file becomes a request; the same signal twice
within DUPLICATE_WINDOW_S is one request; a later second signal, or the grace deadline, ends the process at once
with ABORTED, also while the main thread is busy. (bench/stop_checkpoint_time.py's smoke run: tests/test_bench.py;
several ranks agreeing, the checkpoint and the requeue are in tests/test_slurm.py's two-node test.)"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from recipes.stop_request import ABORTED, DUPLICATE_WINDOW_S, StopRequest, Stopped

ROOT = Path(__file__).resolve().parents[1]


def test_a_signal_or_the_stop_file_is_a_request_and_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(["SIGUSR1"], grace_s=60, request_file=str(tmp_path / "stop")).install()
    try:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while not stop.requested_here() and time.time() < deadline:
            time.sleep(0.01)
        assert stop.agreed() and stop.reason == "SIGUSR1"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
    by_file = StopRequest([], grace_s=60, request_file=str(tmp_path / "stop")).install()
    assert not by_file.agreed()
    (tmp_path / "stop").touch()
    assert by_file.agreed() and by_file.reason == f"stop file {tmp_path / 'stop'}"


def test_stopped_says_where_and_how_to_continue(tmp_path):
    note = tmp_path / "resume"
    first = Stopped(0, 8, None, "SIGTERM")
    assert str(first) == ("stopped on request (SIGTERM) before the first step; nothing was saved: rerun the same "
                          "command to start")
    first.leave_resume_note(str(note))
    assert not note.exists()  # nothing to continue from: the batch script does not requeue
    later = Stopped(3, 8, tmp_path / "step_3", None)
    assert "(another rank was asked) after step 3 of 8; checkpoint" in str(later)
    later.leave_resume_note(str(note))
    assert note.read_text() == f"{tmp_path / 'step_3'}\n"


def run_child(body: str, grace_s: float) -> tuple[subprocess.CompletedProcess, float]:
    code = ("import os, signal, time\nfrom recipes.stop_request import StopRequest\n"
            f"stop = StopRequest(['SIGTERM'], grace_s={grace_s}).install()\n" + body)
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    return result, time.time() - started


def test_the_grace_deadline_ends_a_busy_process_without_waiting_for_it():
    result, seconds = run_child("os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(50)", grace_s=1.0)
    assert result.returncode == ABORTED, result.stderr
    assert "rank 0: the stop did not finish within train.stop_grace_s=1 s of SIGTERM" in result.stderr
    assert seconds < 20


def test_a_second_signal_aborts_but_a_duplicate_does_not():
    duplicate = "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.5)\n"
    result, _ = run_child(duplicate + "print('requested' if stop.requested_here() else 'no')", grace_s=30)
    assert result.returncode == 0 and result.stdout.strip() == "requested", result.stderr
    second = (f"os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep({DUPLICATE_WINDOW_S + 0.5})\n"
              "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(50)")
    result, seconds = run_child(second, grace_s=30)
    assert result.returncode == ABORTED and "a second signal (SIGTERM) after SIGTERM" in result.stderr
    assert seconds < 20
