"""Atomic writes: a folder or file appears complete or not at all (nothing is lost on a crash)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on error it is removed.

    If ``path`` does not exist (or is empty) it is created by one ``rename``. If it already holds files (e.g. a
    Trainer checkpoint being overwritten), each entry is moved in with ``os.replace``: files other writers put
    there are kept, and ``modules.json``, the file that makes a folder a sentence-transformers model, comes last.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(tmp, target)
        return
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "modules.json")
    for entry in entries:
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    tmp.rmdir()


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_ZIP_MAGIC = b"PK\x03\x04"


def damaged_files(folder: str | os.PathLike[str]) -> list[str]:
    """``"relative/path: reason"`` for each file of a saved model or checkpoint folder that is not what it claims.

    Checked (cheaply, without loading any tensor): every ``*.json`` parses; every ``*.safetensors`` header parses and
    covers the file exactly (a truncated or padded file fails); every torch ``*.pt``/``*.pth``/``*.bin`` zip archive
    (torch's format since 1.6) has its central directory and passes its CRC check. Not detected: flipped bytes inside
    a ``.safetensors`` file's tensor data (the format stores no checksum). Legacy non-zip torch files are not checked.
    """
    import zipfile

    from safetensors import safe_open

    root = Path(folder)
    problems: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name, suffix = path.relative_to(root).as_posix(), path.suffix
        try:
            if suffix == ".json":
                json.loads(path.read_text(encoding="utf8"))
            elif suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
            elif suffix in (".pt", ".pth", ".bin"):
                with path.open("rb") as handle:
                    head = handle.read(4)
                if not head:
                    problems.append(f"{name}: empty file")
                elif head == _ZIP_MAGIC:
                    with zipfile.ZipFile(path) as archive:
                        bad = archive.testzip()
                    if bad is not None:
                        problems.append(f"{name}: checksum mismatch in {bad}")
        except Exception as error:  # OSError, ValueError (JSON), BadZipFile, SafetensorError
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            problems.append(f"{name}: {type(error).__name__}: {first_line}")
    return problems


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file's content; a file that does not parse is a ``ValueError`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
