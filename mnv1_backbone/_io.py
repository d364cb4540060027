"""Small file helpers: atomic replacement so a crash never leaves half a file; the image files a command is given."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The temporary file's name holds the writer's process id, so that the next write removes what a killed
    writer (SIGKILL, power loss) left behind; files of live processes are left alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_orphaned_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files of `atomic_write(path, ...)` calls whose process is gone; return them."""
    if os.name != "posix":  # os.kill(pid, 0) only probes a process on POSIX
        return []
    removed = []
    prefix = f".{path.name}."
    for candidate in Path(path).parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid_text = candidate.name[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _process_exists(int(pid_text)):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid at all
        return True
    return True


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by `inputs`: files as given, folders expanded to their images (sorted).

    Shared by `mnv1 detect` and the demo's `predict`. Raises FileNotFoundError for a path that does not exist and
    ValueError when nothing is left."""
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            images.append(item)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    if not images:
        raise ValueError(f"no images found in {[str(i) for i in inputs]}")
    return images
