"""Errors raised by :mod:`lowbit.data`."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DatasetFormatError", "DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found anywhere we looked.

    The message lists every place searched and how to get the data; ``searched`` holds
    the same list for programs.
    """

    def __init__(self, dataset: str, searched: Sequence[str], how_to_get: str) -> None:
        self.dataset = dataset
        self.searched = list(searched)
        self.how_to_get = how_to_get
        lines = [f"dataset {dataset!r} not found. Searched:"]
        lines += [f"  - {s}" for s in self.searched] or ["  (nowhere)"]
        lines.append(f"To get it: {how_to_get}")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep the exception picklable (multiprocessing)
        return (type(self), (self.dataset, self.searched, self.how_to_get))


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format (bad magic, truncated, ...)."""
