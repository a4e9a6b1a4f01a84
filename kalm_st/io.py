"""Atomic writes: a folder or file appears complete or not at all (nothing is lost on a crash).

Every atomic write of kalm-st goes through :func:`atomic_file` or :func:`atomic_directory`: a temporary sibling
(``.{name}.tmp-...``, which a killed run's cleanup recognises), renamed over the target on success. The result gets
the permissions a plain ``open`` / ``mkdir`` would give under the process's ``umask`` (``tempfile`` creates
owner-only ``0600`` files and ``0700`` folders, which a teammate or a serving container cannot read).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux), else set and restored at once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open``: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir``: ``0o777`` less the umask."""
    return 0o777 & ~current_umask()


def _temporary_name(target: Path, suffix: str = "") -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it gets the umask's mode and replaces ``path``.

    On an error the temporary file is removed and ``path`` is left as it was. ``suffix`` ends the temporary name
    (e.g. ``".npy"``, so ``numpy.save`` does not append one).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target, suffix)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf8")
    return Path(path)


def save_numpy_atomic(path: str | os.PathLike[str], array: Any) -> Path:
    """``numpy.save`` to ``path`` atomically."""
    import numpy as np

    with atomic_file(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def save_torch_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything written into it the modes ``open`` / ``mkdir`` give under the umask (libraries
    that write through ``tempfile``, e.g. some weight savers, leave owner-only files); executables stay executable."""
    files, folders = file_mode(), folder_mode()
    os.chmod(root, folders)
    for base, dirs, names in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(base, name), folders)
        for name in names:
            path = os.path.join(base, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o100
            os.chmod(path, folders if executable else files)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on error it is removed.

    If ``path`` does not exist (or is empty) it is created by one ``rename``. If it already holds files (e.g. a
    Trainer checkpoint being overwritten), each entry is moved in with ``os.replace``: files other writers put
    there are kept, and ``modules.json``, the file that makes a folder a sentence-transformers model, comes last.
    The folder and everything in it get the umask's modes (:func:`_apply_umask`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
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
    """Write JSON to ``path`` atomically (indented, keys sorted)."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)


class OutputPathError(PermissionError):
    """An output path that cannot be written, found before any work is done (a ``PermissionError`` whatever the
    cause: read-only, a file in the way, a missing mount)."""


def check_output_path(path: str | os.PathLike[str], *, folder: bool = False, name: str = "output") -> Path:
    """Prove that ``path`` (a file, or a folder with ``folder=True``) can be written, before the work that fills it.

    Creates the missing folders (the folder itself, or a file's parent) and a probe file in it, removed at once.
    Raises :class:`OutputPathError` with one line, ``{name} '{path}' is not writable ({reason})``; every command
    and step that writes a result checks its output this way.
    """
    target = Path(path)
    where = target if folder else target.parent
    if not folder and target.is_dir():
        raise OutputPathError(
            f"{name} {str(target)!r} is a folder; give a file name (e.g. {target / 'data.parquet'})."
        )
    if folder and target.exists() and not target.is_dir():
        raise OutputPathError(f"{name} {str(target)!r} is not writable (it is a file, not a folder)")
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        if where != target:
            reason += f" in {str(where)!r}"
        raise OutputPathError(f"{name} {str(target)!r} is not writable ({reason})") from None
    return target


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
