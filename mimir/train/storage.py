"""Writes that a kill cannot leave half done, and the error a failed write (a full disk, most often) stops with.

A file is written under a temporary name and renamed into place, so it is either whole or absent. When a
checkpoint, a cache shard or the export cannot be written, the run stops with a `RunFailed` that says what was
being written, where, the library's own error and the free space left: torch reports a full disk only as
"[enforce fail at inline_container.cc:...]", safetensors as "os error 28".
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError


class RunFailed(RuntimeError):
    """A run stopped for a reason its user must act on (a failed write, a non-finite loss): the message says
    what happened, where, and what was kept. `mimir train` and `mimir cache` print it and exit with code 1."""


def write_text(path, text: str) -> None:
    """Write `path` whole or not at all (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def reported_write(what: str, path, kept: str, partial=None):
    """Turn a failed write inside the block into a RunFailed naming `what` (e.g. "checkpoint") and `path`;
    `kept` says what is still whole (e.g. the newest checkpoint) and how to go on. `partial`: a file or folder
    the block was writing, removed after a failure (its free space measured first)."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        if isinstance(error, RunFailed):
            raise
        free = shutil.disk_usage(_existing_parent(Path(path))).free
        if partial is not None:
            _remove(Path(partial))
        raise RunFailed(f"writing the {what} {path} failed: {type(error).__name__}: {error}. "
                        f"Its disk has {free / 2 ** 30:.2f} GiB free (a full disk is the usual cause). {kept}") from error


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
