"""Files that a reader or a crash never sees half written: the new content goes to a hidden file beside the target
(same folder, so the same filesystem), which is then renamed over it in one step (`os.replace`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(aside)` writes the new content to `aside`, which then replaces `path` whole."""
    path = Path(path)
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(aside)
    except BaseException:
        aside.unlink(missing_ok=True)
        raise
    os.replace(aside, path)


def write_atomically(path: Path, content: str | bytes) -> None:
    """`path` holds `content` (text as UTF-8), or what it held before if the process dies on the way."""
    data = content.encode() if isinstance(content, str) else content
    replace_atomically(path, lambda aside: aside.write_bytes(data))
