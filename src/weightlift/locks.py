"""One writer at a time for each thing weightlift writes into a folder that processes may share.

A layer cache (`disk`) or a converted model (`convert`) is written under the lock of its target: an
exclusive ``flock`` on the hidden file ``.<name>.lock`` beside it, which holds the holder's pid and
which the holder removes as it lets go. The kernel drops the lock when its holder exits, however it
exits (``kill -9`` included), so a lock is never left stale; a lock file left by a killed holder is
taken over by the next writer. Readers take no lock: a target is only ever renamed into place whole, so
they see the old file or the new one, never a part. Writers check again once they hold the lock (the
process they waited for may have written what they need) and, holding it, remove the temporaries
that writers which died left behind.

A writer waits ``$WEIGHTLIFT_LOCK_TIMEOUT`` seconds (default 600) for another; then it gives up with
an `OffloadError` naming the holder's pid. Where a folder refuses the lock file (read-only) or the
platform has no ``flock``, writing goes on unlocked: the atomic rename alone still keeps every
reader safe, and a write there fails on its own with its own error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import OffloadError

try:
    import fcntl
except ImportError:  # not a POSIX system: no locks (see above)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
_POLL_S = 0.05


def lock_path(target: Path) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` in the same folder."""
    return target.with_name(f".{target.name}.lock")


def timeout_s() -> float:
    """How long a writer waits for another: ``$WEIGHTLIFT_LOCK_TIMEOUT`` seconds, else 600."""
    value = os.environ.get("WEIGHTLIFT_LOCK_TIMEOUT", "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise OffloadError(
            f"`WEIGHTLIFT_LOCK_TIMEOUT`={value!r} is not a number of seconds: set it to e.g. 600, or unset it"
        ) from None
    if seconds < 0:
        raise OffloadError(f"`WEIGHTLIFT_LOCK_TIMEOUT`={value!r} is negative: set it to 0 or more seconds")
    return seconds


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return os.pread(fd, 32, 0).decode().strip() or "unknown"
    return "unknown"


@contextlib.contextmanager
def writing(target: Path) -> Iterator[bool]:
    """Hold the lock of ``target`` for the block, which gets True; `OffloadError` after waiting `timeout_s`
    for another process. Wherever no lock can be had (see the module), the block runs unlocked and gets
    False: then it cannot know that no other write of ``target`` is in progress."""
    target = Path(target)
    fd = _locked(target, time.monotonic() + timeout_s())
    if fd < 0:
        yield False
        return
    try:
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield True
    finally:
        with contextlib.suppress(OSError):  # gone while held: nothing to leave behind
            lock_path(target).unlink()
        os.close(fd)  # closing the only descriptor drops the lock


def _locked(target: Path, deadline: float) -> int:
    """A descriptor of ``target``'s lock file, locked; -1 where no lock can be had. A holder removes the
    file as it lets go, so a lock won on a file no longer at the path is let go and taken again there."""
    while True:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path(target), os.O_RDWR | os.O_CREAT, 0o644) if fcntl is not None else -1
        except OSError as err:
            log.debug("weightlift: no lock for %s (%s): writing unlocked", target, err)
            return -1
        if fd < 0:
            return -1
        if not _flock(fd, target, deadline):
            os.close(fd)
            return -1
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path(target)).st_ino:
                os.ftruncate(fd, 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _flock(fd: int, target: Path, deadline: float) -> bool:
    """Lock ``fd``, waiting until ``deadline``; False on a filesystem without flock."""
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as err:
            log.debug("weightlift: cannot lock %s (%s): writing unlocked", target, err)
            return False
        if time.monotonic() >= deadline:
            holder = _holder(fd)
            os.close(fd)
            raise OffloadError(
                f"another process (pid {holder}) is still writing `{target}` after {timeout_s():g} s: wait "
                "for it to finish, raise `WEIGHTLIFT_LOCK_TIMEOUT` (seconds), or pass another folder"
            )
        if not told:
            log.warning("weightlift: waiting for another process (pid %s) writing %s", _holder(fd), target)
            told = True
        time.sleep(_POLL_S)
