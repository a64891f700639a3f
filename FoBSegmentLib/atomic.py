"""Atomic file output: write a temporary file in the target's folder, then rename it over the target.

A reader, or a crash, never sees a half-written file, and a failed write leaves nothing behind,
neither the target nor the temporary file. The finished file gets the mode a plain `open(path, "w")`
would give it (0666 minus the umask), not the private 0600 of the temporary file.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where the system allows."""
    # os.umask can only be read by setting it; another thread creating a file in that instant would
    # get the wrong mode, so Linux's /proc (thread-safe, read-only) is preferred.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode() -> int:
    """The permission bits a new output file gets: 0666 & ~umask (0644 under the usual umask 022)."""
    return 0o666 & ~_umask()


def _folder_of(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise (one line, naming `path` and `what`) unless `path` can be written atomically; return it.

    Checks before any work that the folder exists and is a folder, that a file can really be created
    in it (a probe file, created and removed: permission bits alone miss read-only file systems
    and say "writable" to root), and that an existing `path` is a file that is not read-only.
    FileNotFoundError for a missing folder, NotADirectoryError / IsADirectoryError for a wrong kind,
    PermissionError otherwise.
    """
    target = Path(path)
    folder = _folder_of(target)
    if not folder.exists():
        raise FileNotFoundError(f"folder {folder} of {what} {target} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} {target}: {folder} is not a folder")
    if target.is_dir():
        raise IsADirectoryError(f"{what} {target} is a folder; give a file name")
    if target.exists():
        mode = target.stat().st_mode
        # No write bit for anyone = the user protected the file; the rename would replace it anyway
        # on POSIX (and fail on Windows), so refuse the same way everywhere. os.access covers the
        # cases where the bits allow someone else but not this user.
        if not os.access(target, os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(f"{what} {target} exists and is read-only; remove it or choose another name")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fob-write-check.", dir=folder)
    except OSError as exc:
        raise PermissionError(f"cannot write {what} {target}: folder {folder} is not writable ({_reason(exc)})") from None
    os.close(fd)
    os.unlink(probe)
    return target


def _reason(exc: OSError) -> str:
    """The OS's reason without the file name it mentions (that name is our temporary file's)."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return exc.strerror or type(exc).__name__


@contextmanager
def atomic_output(path: str | os.PathLike, make_parents: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path`; on a normal exit it replaces `path`, on an error it is removed.

    The temporary name ends with the target's own suffixes (`.nii.gz`, `.safetensors`...), so writers
    that pick the format from the extension write the right one. Without `make_parents` a missing
    folder is an error (FileNotFoundError), as it should be for user-given output paths. Errors
    creating or renaming the temporary file name `path`, never the temporary file.
    """
    target = Path(path)
    folder = _folder_of(target)
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part" + "".join(target.suffixes), dir=folder)
    except OSError as exc:
        raise _named_error(exc, target, folder) from None
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file 0600 (private while being written); the result is an ordinary output.
        # Best effort: some mounts (CIFS, some FUSE) refuse chmod, and the data matters more than its mode.
        try:
            os.chmod(tmp, output_mode())
        except OSError:
            pass
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise _named_error(exc, target, folder) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _named_error(exc: OSError, target: Path, folder: Path) -> OSError:
    """The same kind of OSError, its message naming the user's `target` instead of a temporary file."""
    # Single-argument constructors: str() of OSError(errno, text) would prefix "[Errno N]".
    if exc.errno == errno.ENOENT:
        return FileNotFoundError(f"cannot write {target}: folder {folder} does not exist")
    if exc.errno == errno.ENOTDIR:
        return NotADirectoryError(f"cannot write {target}: {folder} is not a folder")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(f"cannot write {target}: folder {folder} is not writable ({_reason(exc)})")
    if exc.errno == errno.EISDIR:
        return IsADirectoryError(f"cannot write {target}: it is a folder")
    return OSError(f"cannot write {target} ({_reason(exc)})")


def write_text_atomic(path: str | os.PathLike, text: str, make_parents: bool = True) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_output(path, make_parents=make_parents) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")

