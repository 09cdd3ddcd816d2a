"""One writer at a time per target, across threads and processes; a lock never outlives its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from weightlift import OffloadError, locks

HOLD = """
import sys, time
from pathlib import Path
from weightlift import locks
with locks.writing(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(target):
    """A process holding ``target``'s lock (it says so on stdout first)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_writers_take_turns_and_leave_no_lock_file(tmp_path):
    target = tmp_path / "cache.safetensors"
    inside, order = threading.Event(), []

    def first():
        with locks.writing(target):
            inside.set()
            time.sleep(0.3)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait()
    assert locks.lock_path(target).read_text().strip() == str(os.getpid())
    with locks.writing(target) as alone:  # waits for the first writer (another descriptor: flock excludes it)
        order.append(f"second in, alone: {alone}")
    thread.join()
    assert order == ["first out", "second in, alone: True"]
    assert list(tmp_path.iterdir()) == []


def test_a_writer_waits_then_gives_up_naming_the_holder_and_the_fix(tmp_path, monkeypatch, caplog):
    target = tmp_path / "cache.safetensors"
    child = _holder(target)
    try:
        monkeypatch.setenv("WEIGHTLIFT_LOCK_TIMEOUT", "0.3")
        began = time.monotonic()
        match = rf"another process \(pid {child.pid}\) is still writing.*`WEIGHTLIFT_LOCK_TIMEOUT`"
        with pytest.raises(OffloadError, match=match), locks.writing(target):
            pytest.fail("the lock was taken while another process held it")
        assert time.monotonic() - began >= 0.3
        assert f"waiting for another process (pid {child.pid})" in caplog.text
    finally:
        child.kill()
        child.wait()


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path, monkeypatch):
    target = tmp_path / "cache.safetensors"
    child = _holder(target)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert locks.lock_path(target).exists()  # left behind by the killed holder ...
    monkeypatch.setenv("WEIGHTLIFT_LOCK_TIMEOUT", "0")
    with locks.writing(target):  # ... but no process holds it
        pass
    assert not locks.lock_path(target).exists()


def test_a_lock_won_on_a_removed_lock_file_is_not_held(tmp_path):
    """A waiter that wins the lock of a file its holder removed (as every holder does on leaving) must not
    go on beside a writer that created the file anew: it waits for the lock of the file at the path."""
    import fcntl

    target = tmp_path / "cache.safetensors"
    path = locks.lock_path(target)
    old = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(old, fcntl.LOCK_EX)
    got = []
    waiter = threading.Thread(target=lambda: got.append(locks._locked(target, time.monotonic() + 10)))
    waiter.start()
    time.sleep(0.2)  # the waiter has opened the old file and waits on it
    path.unlink()  # the holder leaves, as `writing` does: file removed, then lock let go ...
    new = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(new, fcntl.LOCK_EX)  # ... and a third writer takes the new file first
    os.close(old)
    time.sleep(0.3)
    assert got == []  # the waiter won the old file's lock, saw it removed, and waits on the new one
    os.close(new)
    waiter.join()
    assert os.fstat(got[0]).st_ino == os.stat(path).st_ino
    os.close(got[0])


def test_a_folder_that_refuses_the_lock_file_is_written_unlocked(tmp_path, monkeypatch):
    target = tmp_path / "cache.safetensors"
    real = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    ran = []
    with locks.writing(target) as alone:
        ran.append(alone)
    assert ran == [False] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value,match", [("soon", "not a number"), ("-1", "negative")])
def test_a_bad_lock_timeout_names_the_variable(tmp_path, monkeypatch, value, match):
    monkeypatch.setenv("WEIGHTLIFT_LOCK_TIMEOUT", value)
    with pytest.raises(OffloadError, match=f"`WEIGHTLIFT_LOCK_TIMEOUT`={value!r} is {match}"), locks.writing(tmp_path):
        pass
