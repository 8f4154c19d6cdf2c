"""One exception type for every data problem, with messages that name the path.

Readers raise :class:`DatasetError` before anything reaches a DataLoader worker where they can,
and from inside ``__getitem__`` otherwise; either way the message says which file and what was
expected, so the user never has to decode a worker traceback.
"""

from __future__ import annotations

from pathlib import Path


class DatasetError(FileNotFoundError, ValueError):
    """A dataset is missing, misplaced or damaged. The message names the path.

    It subclasses both ``FileNotFoundError`` and ``ValueError`` so that callers written against
    either convention catch it; its only constructor argument is the message, so it survives the
    pickling a DataLoader worker does when it forwards an exception to the main process.
    """

    def __init__(self, message: str):
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def with_layout(message: str, layout: str | None) -> str:
    if not layout:
        return message
    return f"{message}\nExpected layout under --root:\n{layout.rstrip()}"


def require_dir(path: Path, what: str, layout: str | None = None) -> Path:
    if not path.is_dir():
        raise DatasetError(with_layout(f"{what} not found: {path} is not a directory.", layout))
    return path


def require_file(path: Path, what: str, layout: str | None = None) -> Path:
    if not path.is_file():
        raise DatasetError(with_layout(f"{what} not found: {path} does not exist.", layout))
    return path


def first_existing(candidates: list[Path], what: str, layout: str | None = None) -> Path:
    """The first candidate directory that exists; the error lists every place looked in."""
    for c in candidates:
        if c.is_dir():
            return c
    tried = "\n".join(f"  {c}" for c in candidates)
    raise DatasetError(with_layout(f"{what} not found; looked in:\n{tried}", layout))
