"""A user's Ctrl-C (issue 24): one rule for a plain run, a sweep and a distributed job. The job
that was running writes nothing, no later job starts, and the command ends with one line saying
what was saved (exit status 130), never a traceback or a record of an ordinary failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

LONG = ["train.steps=100000", "train.batch_size=4", "task.num_train=64", "measure.decode_tokens=0"]


def start(tmp_path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "peftbench", *args, *LONG, f"results_dir={tmp_path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group: Ctrl-C reaches every process of it, as in a terminal
    )


def ctrl_c_once_training(proc: subprocess.Popen, tmp_path, settle_s: float) -> tuple[int, str]:
    """Wait for a job to start (its running marker), let it get into training, then send SIGINT to
    the whole process group, as a terminal's Ctrl-C does; the exit status and standard error."""
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".running-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(settle_s)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize(
    "args, settle_s",
    [(["-m", "method=lora,ia3"], 3.0), (["method=lora", "parallel=ddp", "parallel.nproc=2"], 12.0)],
    ids=["sweep", "ddp"],
)
def test_ctrl_c_stops_the_command_in_one_line_and_writes_nothing_half_done(tmp_path, args, settle_s):
    code, err = ctrl_c_once_training(start(tmp_path, *args), tmp_path, settle_s)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    jobs = 2 if "-m" in args else 1
    assert err.strip().splitlines()[-1] == (
        f"peftbench: interrupted (Ctrl-C): 0 of {jobs} job(s) wrote a record before it; the job that was running "
        "wrote nothing; the same command runs what is left, reusing what was saved"
    )
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".running-*"))


def test_a_rank_stops_once_when_ctrl_c_reaches_it_twice():
    """A rank gets a terminal's Ctrl-C twice (the process group's and its launcher's forwarded
    SIGINT); the second, arriving while the first unwinds, is ignored rather than raised inside
    the unwinding (where it printed an uncatchable traceback: CI, 2026-12-07)."""
    code = (
        "import os, signal, time\n"
        "from peftbench.launch import interrupt_once\n"
        "interrupt_once()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5)\n"
        "    print('unwound once')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "unwound once", done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_ctrl_c_that_python_drops_in_a_finalizer_is_raised_again():
    """Python drops a KeyboardInterrupt raised inside a finalizer or weakref callback (the memory
    tracker's, tqdm's), and a sweep would train on (the sweep case timed out once in a full
    suite); ``app.CtrlC`` raises it again until the command catches it."""
    code = (
        "import os, signal, time\n"
        "from peftbench.app import CtrlC\n"
        "c = CtrlC(retry_s=0.2)\n"
        "c.install()\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.2)\n"
        "try:\n"
        "    Finalized()\n"
        "    time.sleep(10)\n"
        "    print('ran on')\n"
        "except KeyboardInterrupt:\n"
        "    c.caught()\n"
        "    print('stopped')\n"
        "c.restore()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "Exception ignored" in done.stderr  # the first interrupt was dropped inside __del__
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr[-2000:]
