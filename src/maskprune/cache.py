"""maskprune's on-disk cache (``$MASKPRUNE_CACHE``, else ``~/.cache/maskprune``): folders built once and then
reused, safe when several processes ask for the same folder at once (parallel test workers, two runs started
together). A folder is built in a staging folder beside it and renamed into place under a file lock, so a
reader sees it complete or not at all, and it is built once however many processes ask."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock

__all__ = ["cache_dir", "build_once", "source_fingerprint"]


def cache_dir() -> Path:
    """``$MASKPRUNE_CACHE``, else ``~/.cache/maskprune``."""
    return Path(os.environ.get("MASKPRUNE_CACHE", Path.home() / ".cache" / "maskprune"))


def source_fingerprint(source: str, gguf_file: str | None = None) -> str:
    """What identifies a model's weights for a cache key: its path or hub id, the GGUF file, and for a local source
    the name, size and modification time of every weight and config file (a rewritten checkpoint changes it)."""
    parts = [f"source={source}", f"gguf={gguf_file}"]
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(
            p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json")
        )  # fmt: skip
        for f in files:
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def build_once(target: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Return ``target``, first calling ``build(staging_folder)`` and renaming the result to ``target`` where
    ``is_complete(target)`` is false. Concurrent callers wait on a lock beside ``target``; the first builds, the
    others find it complete. A leftover incomplete ``target`` is replaced; a failed build leaves nothing."""
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_complete(target):  # another process built it while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
