"""Write a directory atomically, with modes any reader can use: checkpoints and adapters.

`replace_dir(out)` yields a fresh temp dir beside `out`; the caller fills it. When the block ends
without an exception the tree gets directories 0755 and files 0644 (never more than the process
umask allows), is renamed onto `out`, and the previous `out`, if any, is removed after. When the
block raises, the temp dir is removed and `out` is left as it was: never a half-written dir. A
writer killed outright (SIGKILL: no cleanup runs) leaves its temp dir; temp dirs carry their
process id (`.OUT.tmp-PID-xxxx`), so the next `replace_dir(out)` removes those whose process is
gone, and those of writers from before they carried one. The modes matter because a checkpoint
written by one user (root, say) is mounted read-only into a container that runs as another.
Knows nothing about what the files hold.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DIR_MODE = 0o755
FILE_MODE = 0o644


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_modes(root: Path) -> None:
    """chmod `root` and everything under it: dirs 0755, files 0644, each masked by the umask."""
    mask = current_umask()
    os.chmod(root, DIR_MODE & ~mask)
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(parent, d), DIR_MODE & ~mask, follow_symlinks=False)
        for f in files:
            path = os.path.join(parent, f)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE & ~mask)


@contextmanager
def replace_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir to fill; on success it becomes `out` (see the module docstring).

    Raises FileExistsError up front if `out` exists and not `overwrite`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        yield tmp
        open_modes(tmp)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_prefix(out: Path, kind: str = "") -> str:
    return f".{out.name}.{kind}tmp-{os.getpid()}-"


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Remove the temp dirs of `out`'s writers that are gone: `.OUT.[old.]tmp-PID-*` whose
    process does not exist, and `.OUT.[old.]xxxxxxxx` (writers from before temp dirs carried
    their process id). Returns what it removed."""
    out = Path(out)
    stale = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        tag = path.name[len(out.name) + 2 :].removeprefix("old.")
        named = re.fullmatch(r"tmp-(\d+)-\w+", tag)
        legacy = re.fullmatch(r"[a-z0-9_]{8}", tag)
        if path.is_dir() and (legacy or (named and not _alive(int(named[1])))):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _swap(tmp: Path, out: Path) -> None:
    """Rename `tmp` onto `out`; an existing `out` is moved aside first and removed after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old."), dir=out.parent))
    try:
        os.replace(out, trash / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(trash / out.name, out)  # put the old one back
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
