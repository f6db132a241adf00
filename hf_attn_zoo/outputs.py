"""Finished work is never overwritten: the one policy every command that writes a model, plan, profile or report uses.

- `check_output(path)`: an output that already holds something (a non-empty folder, or a file) is refused with an
  `OutputExistsError` naming the path and the fix (`--overwrite` / `overwrite=True`).
- `atomic_output(path)`: the output is written into a temporary sibling (`NAME.partial-<pid>`, or
  `NAME.partial-<pid>.SUFFIX` for a file) and renamed into place only once complete, so a crash never leaves a
  half-written folder that looks finished.
- `claim_folder(path, command)`: a work folder that several stages fill and re-use (`upcycle-study`, `demo`) is
  marked with `hf_attn_zoo_job.json`; a rerun of the same command reuses it, a folder holding anything else is
  refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputExistsError

__all__ = [
    "JOB_MARKER",
    "OVERWRITE_HINT",
    "atomic_output",
    "check_output",
    "claim_folder",
    "clear_folder",
    "holds_something",
]

JOB_MARKER = "hf_attn_zoo_job.json"
OVERWRITE_HINT = "pass --overwrite on the command line (overwrite=True in Python) to replace it, or choose another path"


def holds_something(path: str | os.PathLike) -> bool:
    """True for an existing file, or a folder with anything in it."""
    path = Path(path)
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def check_output(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> None:
    """Refuse (`OutputExistsError`) an output `path` that already holds something, unless `overwrite`."""
    path = Path(path)
    if overwrite or not holds_something(path):
        return
    kind = "folder" if path.is_dir() else "file"
    raise OutputExistsError(
        f"the {what} {path} is an existing non-empty {kind}; refusing to overwrite it: {OVERWRITE_HINT}."
    )


def _partial(path: Path, is_file: bool) -> Path:
    tag = f"partial-{os.getpid()}"
    if is_file and path.suffix:
        return path.with_name(f"{path.stem}.{tag}{path.suffix}")  # keeps the suffix writers may look at
    return path.with_name(f"{path.name}.{tag}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, overwrite: bool = False, is_file: bool = False, what: str = "output"
) -> Iterator[Path]:
    """Check `path` (see `check_output`), then yield a temporary sibling to write into; on success it replaces
    `path`, on an exception it is removed and `path` is left as it was.

    Example:
        >>> with atomic_output("out/model", overwrite=False) as tmp:
        ...     model.save_pretrained(tmp)
    """
    path = Path(path)
    check_output(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(path, is_file)
    _remove(partial)
    if not is_file:
        partial.mkdir()
    try:
        yield partial
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(partial)
        raise
    if path.exists() or path.is_symlink():  # an empty folder, or what `overwrite` replaces
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        _remove(old)
        path.rename(old)
        partial.rename(path)
        _remove(old)
    else:
        partial.rename(path)


def clear_folder(path: str | os.PathLike) -> None:
    """Remove everything inside `path` (the folder itself stays)."""
    for child in Path(path).iterdir():
        _remove(child)


def claim_folder(path: str | os.PathLike, command: str, overwrite: bool = False, own: Iterable[str] = ()) -> Path:
    """Make `path` the work folder of `command`, a job whose stages are cached there and reused by a rerun.

    A missing or empty folder, or one marked (`hf_attn_zoo_job.json`) by the same command, is used as it is; one
    holding only the names in `own` (a cache written before the marker existed) is adopted. Anything else is refused
    (`OutputExistsError`). `overwrite` empties the folder first (start over).
    """
    path = Path(path)
    marker = path / JOB_MARKER
    if holds_something(path) and overwrite:
        clear_folder(path)  # start over
    elif holds_something(path):
        ours = False
        if marker.is_file():
            with contextlib.suppress(ValueError, OSError):
                ours = json.loads(marker.read_text()).get("command") == command
        else:
            ours = bool(own) and {child.name for child in path.iterdir()} <= set(own)
        if not ours:
            raise OutputExistsError(
                f"{path} holds files that are not from `hf-attn-zoo {command}`; refusing to "
                f"write into it: {OVERWRITE_HINT} (which empties it first)."
            )
    path.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        marker.write_text(json.dumps({"command": command}) + "\n")
    return path
