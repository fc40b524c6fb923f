"""Writing a model folder safely: refuse to replace what is not ours, build it in a temporary sibling, move it in.

`staging(target)` is the one atomic-folder writer (exports, ONNX graphs, recipe outputs): a killed writer leaves
a hidden sibling that the next write removes, never a half-written folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

_MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.gguf", "*.onnx")


def holds_model(folder: Path) -> bool:
    return folder.is_dir() and any(any(folder.glob(pattern)) for pattern in _MODEL_FILE_PATTERNS)


def check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder.")
    if holds_model(target) and not overwrite:
        raise FileExistsError(
            f"{target} already holds a model (config.json or weights): pass overwrite=True to replace it, or choose "
            "another folder."
        )


def check_no_foreign_files(target: Path, names: list[str], what: str | None = None) -> None:
    """Refuse an export into a folder without a model where it would replace files of the user's (`names`).

    A folder holding a model is replaced whole, with `overwrite`; one without is written into, and what is not
    ours in it (logs, notes) stays, but a file of the same name as ours (a README.md, say) is never replaced.
    """
    if holds_model(target) or not target.is_dir():
        return
    clashes = sorted(name for name in names if (target / name).exists())
    if clashes:
        raise FileExistsError(
            f"{what or target}: the folder holds {clashes}, not part of a compressed model, which an export would "
            "replace; move them elsewhere, or choose another folder."
        )


@contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` to write into, moved into place only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become the folder's once moved into place
    try:
        yield tmp
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    # The writer's pid in the name tells a killed run's leftover from a folder another process is writing.
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _remove_leftovers(target: Path) -> None:
    """Remove the staging folders of earlier writes of `target` killed before their cleanup (SIGTERM, SIGKILL).

    A `.old-` folder is the previous model during a swap: it is removed only once `target` holds a model again.
    """
    for kind in ("tmp", "old"):
        prefix = f".{target.name}.{kind}-"
        for entry in target.parent.iterdir():
            if not entry.name.startswith(prefix) or _writer_alive(entry.name[len(prefix) :]):
                continue
            if kind == "tmp" or holds_model(target):
                logger.info("Removing %s, left by an interrupted export.", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _writer_alive(suffix: str) -> bool:
    pid = suffix.split("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False  # an older name without a pid, or this process's own earlier (finished or failed) write
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        tmp.rename(target)
    elif holds_model(target):  # overwrite was checked: swap, then drop the old folder
        old = _sibling(target, "old")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:  # a folder without a model (e.g. logs): add our files, config.json last so no half model is visible
        check_no_foreign_files(target, [entry.name for entry in tmp.iterdir()])
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(entry, target / entry.name)
