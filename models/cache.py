"""The kiln cache (fetched wheels, unpacked sources, exported graphs) and the one way kiln
publishes a directory: the cache's entries and the artifacts behind `kiln compile -o`.

Location: $KILN_CACHE, default ~/.cache/kiln.

`atomic_dir(final)` yields a temporary sibling of `final` to fill; once it is complete it takes
`final`'s place in one atomic rename, so a reader sees the old directory whole or the new one
whole, never a missing or half-written one:
- mode "new": `final` must not exist by then (a concurrent writer that finished first wins; this
  one fails with FileExistsError);
- mode "replace": an existing `final` is swapped out in one step (Linux renameat2 with
  RENAME_EXCHANGE), then deleted;
- mode "keep": if another writer finished `final` first, its copy stays and this one is dropped
  (cache entries: both hold the same content).
Temporary directories carry their writer's pid: those of dead processes (SIGKILL leaves them) are
removed by the next writer into the same parent, whatever name they were for.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_NOREPLACE, _EXCHANGE = 1, 2  # renameat2 flags (linux/fs.h)
_AT_FDCWD = -100


def cache_root() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln").expanduser()


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path, mode: str = "keep") -> Iterator[Path]:
    """Yield a temporary sibling of `final`; when the block succeeds it becomes `final` (see the
    module docstring for `mode`). On failure nothing is left behind."""
    if mode not in ("new", "replace", "keep"):
        raise ValueError(f"atomic_dir mode must be new, replace or keep, not {mode!r}")
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final directory should not be
    try:
        yield tmp
        try:
            _rename(tmp, final, _NOREPLACE)
        except FileExistsError:
            if mode == "new":
                raise
            if mode == "replace":
                _rename(tmp, final, _EXCHANGE)  # tmp now holds the old directory: removed below
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(parent: Path, pattern: str = ".*.tmp-*") -> int:
    """Remove the temporary directories of kiln processes that no longer run (their pid follows
    `tmp-` in the name). Returns how many."""
    removed = 0
    for stale in parent.glob(pattern):
        pid = stale.name.rsplit("tmp-", 1)[-1].split("-")[0]
        if stale.is_dir() and not stale.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def exclusive(final: Path) -> Iterator[None]:
    """Hold `final`'s writer lock (`.NAME.lock` beside it) or raise BlockingIOError when another
    process holds it. The lock file is removed on the way out."""
    lock = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file we locked: lock the current one
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _rename(src: Path, dst: Path, flags: int) -> None:
    """renameat2(src, dst, flags); where the call or the flag is not supported (not Linux, or a
    filesystem without it), the nearest portable equivalent."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(dst))
    if flags == _NOREPLACE:
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    # no atomic exchange here: move the old one aside, the new one in, the old one to src
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    os.rename(dst, aside / "old")
    os.rename(src, dst)
    os.rename(aside / "old", src)
    aside.rmdir()


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
