"""Crash-safe files for every output and cache entry: write-then-rename, locks, tensor files that verify themselves.

Every output and cache entry goes through here, so a kill at any moment leaves either the old file or
the new one where a good one is expected, never half of one; a corrupted cache entry is detected by
its checksums, reported, and rebuilt by the caller.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file

FORMAT_VERSION = "kd-search-1"
_UMASK_LOCK = threading.Lock()
_PROC_STATUS = "/proc/self/status"  # Linux: its `Umask:` line


def current_umask() -> int:
    """The process's umask, read when it is needed (importing kd changes nothing): from /proc on Linux (4.7 and
    later), else by setting and restoring it under a lock (a file another thread creates in that instant is at
    worst more private, never less)."""
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


class CacheError(Exception):
    """A cache file that is missing, truncated, corrupted or of another format version."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` (a directory) when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`.lock: two processes filling one cache entry take turns."""
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _crc(t: torch.Tensor) -> int:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy().data) if flat.numel() else 0


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a safetensors file whose header carries `meta`, a format version and a CRC per tensor."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {
        "format": FORMAT_VERSION,
        "meta": json.dumps(meta, default=_json_default),
        "crc": json.dumps({k: _crc(v) for k, v in tensors.items()}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_tensors`, raising CacheError unless every check passes.

    The file is read into memory rather than memory-mapped: a mapped file that is later truncated in place
    would crash the process (SIGBUS) the next time a tensor is touched.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path} does not exist")
    try:
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 + size:
            raise CacheError(f"{path} is truncated ({len(raw)} bytes, its header alone claims {size})")
        header = json.loads(raw[8:8 + size]).get("__metadata__") or {}
        if header.get("format") != FORMAT_VERSION:
            raise CacheError(f"{path} has format {header.get('format')!r}, expected {FORMAT_VERSION!r}")
        tensors = load(raw)
        crcs = json.loads(header["crc"])
        meta = json.loads(header["meta"])
    except CacheError:
        raise
    except Exception as e:  # truncated, not safetensors, bad JSON: all mean "rebuild it"
        raise CacheError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if set(crcs) != set(tensors):
        raise CacheError(f"{path} is missing tensors")
    for k, t in tensors.items():
        if _crc(t) != crcs[k]:
            raise CacheError(f"{path}: checksum mismatch in '{k}' (the file is corrupted)")
    return tensors, meta


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object written by `atomic_write_json`, or None where it is missing or unreadable."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file that may be in use or cut short by a kill: unreadable lines are skipped."""
    records: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text()
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):  # a dataclass that says how it is written (kd.teacher.TeacherInfo)
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
