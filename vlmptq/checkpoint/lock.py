"""One run per output directory: an advisory lock beside it, ``<out>.vlmptq-lock``.

Two runs writing the same ``--out`` would share its progress store (``<out>.vlmptq-progress/``) and race
to rename their checkpoints into place; the second run is refused at the start instead, naming the
first (process id, host, start time). The lock is ``flock`` on the file, so it dies with its process:
a run killed with SIGKILL leaves the file behind but not the lock, and the next run takes it over.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmptq.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".vlmptq-lock"


def lock_path_for(out: str | Path) -> Path:
    out = Path(out).absolute()
    return out.with_name(out.name + LOCK_SUFFIX)


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold ``out``'s lock for the body; ConfigError if another live run holds it."""
    path = lock_path_for(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the output's folder {path.parent} ({e}); choose a writable --out") from e
    fd = _acquire(path)
    try:
        yield
    finally:
        if fd is not None:
            try:
                path.unlink()  # while still holding the lock: a waiting opener retries on the new file
            except OSError:
                pass
            os.close(fd)


def _acquire(path: Path) -> int | None:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot create the lock file {path} ({e}); choose a writable --out") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(
                f"another vlmptq run ({holder or 'holder unknown'}) is writing {path.name[:-len(LOCK_SUFFIX)]} "
                f"(lock {path}); wait for it to finish or choose another --out"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise CheckpointError(f"cannot lock {path} ({e})") from e
            logger.warning("%s: this file system has no file locks (%s); nothing stops a second run "
                           "from writing the same --out at the same time", path, e)
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our lock: take the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        return fd


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        return ""
