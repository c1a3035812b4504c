"""Write a whole output folder or nothing: build it in a temporary sibling, rename it into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final`` to write into. When the block ends normally the sibling
    replaces ``final`` (which must be absent or empty); on any error it is removed and ``final`` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if final.exists():
            final.rmdir()
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
