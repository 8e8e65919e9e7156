"""Atomic file writes: a reader (or a resumed run) sees the previous file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from vision_transfer.errors import DiskFullError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def write_atomic(
    path: str | Path, data: bytes | memoryview, what: str = "file", kept: str | None = None, advice: str = ""
) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over ``path``.

    Args:
        path: the file to write.
        data: its whole content.
        what: what the file is, for the error message (``checkpoint``, ``feature shard``).
        kept: what is still intact when the disk fills up; default: the previous file, if any.
        advice: what to do then, appended to the error message.

    Raises:
        DiskFullError: the disk or the quota is full; the temporary file is removed and ``path``
            is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace stays a rename
    existed = path.is_file()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            if kept is None:
                kept = f"the previous {path.name} is intact" if existed else f"no partial {path.name} was left"
            free = _human(shutil.disk_usage(path.parent).free)
            message = f"disk full while writing {what} {path} ({free} free there); {kept}"
            raise DiskFullError(f"{message}; {advice}." if advice else f"{message}.") from e
        raise
    _fsync_folder(path.parent)


def paths_as_text(hparams: MutableMapping[str, Any]) -> None:
    """Record ``os.PathLike`` values (alone or in a list) as text, in place: a checkpoint's hyperparameters
    must load under ``torch.load(weights_only=True)``, which refuses a pickled ``pathlib.Path``."""
    for key, value in hparams.items():
        if isinstance(value, os.PathLike):
            hparams[key] = os.fspath(value)
        elif isinstance(value, list | tuple) and any(isinstance(item, os.PathLike) for item in value):
            hparams[key] = [os.fspath(item) if isinstance(item, os.PathLike) else item for item in value]


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort (not every file system allows it)."""
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


def _human(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"
