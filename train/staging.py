"""Staging folders: a stage writes its artefacts into one, then renames it into place, so nothing half-written ever
looks complete. A run killed part-way leaves its staging folder behind; the next run of the same stage in the same
place removes it, unless a live process still holds it.

Each staging folder ``PREFIXxxxx`` has a lock file ``PREFIXxxxx.lock`` beside it, flock'ed by the process writing it
for as long as it writes. The lock is taken before the folder exists, so a folder whose lock can be taken belongs to
no live process. The kernel drops the lock when its process dies, ``kill -9`` included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"
UNLOCKED_AGE_S = 600  # a folder without a lock file (an older edgetune's) is left alone until it is this old


@contextlib.contextmanager
def staging_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new empty folder ``parent/PREFIXxxxx``, held for the block and removed after it unless the block renamed it
    into place. Stale staging folders of the same prefix in ``parent`` are removed first."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, prefix)
    fd, lock_path = tempfile.mkstemp(prefix=prefix, suffix=LOCK, dir=parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp = Path(lock_path[: -len(LOCK)])
        tmp.mkdir(mode=0o700)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.unlink(lock_path)
        os.close(fd)


def _held(lock: Path) -> bool:
    """Whether a live process holds ``lock`` (False also when it no longer exists)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the staging folders (and lock files) of ``prefix`` in ``parent`` that no live process holds; return
    the folders removed."""
    removed = []
    for path in sorted(parent.iterdir()):
        if not path.name.startswith(prefix):
            continue
        if path.name.endswith(LOCK):
            orphan = not path.with_name(path.name[: -len(LOCK)]).exists()
            if orphan and time.time() - path.stat().st_mtime > 60 and not _held(path):
                path.unlink(missing_ok=True)  # (a minute old: not one whose folder is about to be made)
            continue
        if not path.is_dir():
            continue
        lock = path.with_name(path.name + LOCK)
        if lock.exists():
            if _held(lock):
                continue  # a live run is writing it
        elif time.time() - path.stat().st_mtime < UNLOCKED_AGE_S:
            continue
        shutil.rmtree(path, ignore_errors=True)
        lock.unlink(missing_ok=True)
        removed.append(path)
    return removed
