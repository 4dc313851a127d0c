"""One run per output directory (``vlmptq/checkpoint/lock.py``): a second run writing the same --out is
refused at once, naming the first; a killed holder leaves no lock behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import vlmptq
from vlmptq.checkpoint.lock import lock_path_for, output_lock
from vlmptq.errors import ConfigError

HOLD = """
import sys, time
from vlmptq.checkpoint.lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_is_refused_and_the_file_goes_with_the_lock(tmp_path):
    out = tmp_path / "ckpt"
    with output_lock(out):
        assert lock_path_for(out).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(ConfigError, match=rf"another vlmptq run \(pid {os.getpid()} on .*\) is writing ckpt "
                                              r"\(lock .*ckpt\.vlmptq-lock\); wait for it to finish or choose"):
            with output_lock(out):
                pass
    assert not lock_path_for(out).exists() and not out.exists()
    with output_lock(out):  # free again
        pass


def test_quantize_refuses_an_output_another_process_is_writing(tmp_path):
    out = tmp_path / "nested" / "ckpt"
    proc = _holder(out)
    try:
        with pytest.raises(ConfigError, match=rf"another vlmptq run \(pid {proc.pid} on "):
            vlmptq.quantize(tmp_path / "no-such-model", out)  # refused before the model is even looked at
        assert not out.exists() and not (tmp_path / "nested" / "ckpt.vlmptq-progress").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # A holder killed outright leaves its file but not its lock: the next run takes it over.
    assert lock_path_for(out).exists()
    with output_lock(out):
        assert lock_path_for(out).read_text().startswith(f"pid {os.getpid()} ")
    assert not lock_path_for(out).exists()


def test_an_opener_that_locks_a_removed_file_retries_on_the_new_one(tmp_path, monkeypatch):
    """The holder removes the file while still holding it. A run that opened the old file just before
    and gets its lock just after holds a lock on a removed file, which protects nothing: it must notice
    (inode check) and lock the file now at the path instead."""
    import fcntl

    import vlmptq.checkpoint.lock as lock

    out, real_flock, calls = tmp_path / "ckpt", fcntl.flock, []

    def flock(fd, op):
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:  # the previous holder finishes between our open and our flock
            lock_path_for(out).unlink()
        return real_flock(fd, op)

    lock_path_for(out).write_text("pid 1 on elsewhere, started long ago")
    monkeypatch.setattr(lock.fcntl, "flock", flock)
    with output_lock(out):
        assert len(calls) == 2  # locked the removed file, saw it, locked the new one
        assert lock_path_for(out).read_text().startswith(f"pid {os.getpid()} ")
    assert not lock_path_for(out).exists()
