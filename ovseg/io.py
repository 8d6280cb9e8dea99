"""Atomic file writes: the one way ovseg replaces a file (checkpoints, shards, caches, stores).

:func:`atomic_write` opens a hidden temporary file *in the target's folder*
(``.NAME.tmp-<random>.tmp``), hands out its binary handle, and renames it over the target only once
the body has finished: a reader (or a crash: SIGKILL, node failure, full disk) sees the old file or
the complete new one, never a part. The temporary file lies on the target's filesystem, so the
final ``os.replace`` is a rename, not a copy.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_json"]


def _default_mode() -> int:
    """0666 minus the umask: the mode ``open`` would give (``mkstemp`` files start at 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: str | os.PathLike) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, fsync: bool = False, remove_stale: bool = False) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file next to it, renamed into place when the body ends.

    Yields the temporary file's binary handle (``open(..., "wb")``). If the body raises, the
    temporary file is removed and ``path`` is left as it was. The new file gets the usual mode
    (0666 minus the umask).

    Args:
        path: the target file; its folder is created if needed.
        fsync: flush the file and then its folder to disk (checkpoints: survive a power loss).
        remove_stale: afterwards, delete temporary files that earlier killed writes of ``path``
            left behind (only when nothing else writes ``path`` at the same time).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.chmod(temp, _default_mode())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    if fsync:
        _fsync_folder(path.parent)
    if remove_stale:
        for stale in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.tmp-*")):
            try:
                os.unlink(stale)
            except OSError:
                pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (a str is UTF-8 encoded) to ``path`` atomically."""
    with atomic_write(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = None) -> None:
    """``json.dump`` to ``path`` atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=indent))


def atomic_torch_save(obj: Any, path: str | os.PathLike, fsync: bool = False, remove_stale: bool = False) -> None:
    """``torch.save(obj, path)`` atomically: serialised to memory first, then written in one go
    (see :func:`atomic_write` for ``fsync`` and ``remove_stale``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path, fsync=fsync, remove_stale=remove_stale) as handle:
        handle.write(buffer.getbuffer())
