"""Errors of the export package."""

from __future__ import annotations


class FormatError(ValueError):
    """A file that is not a valid .lowbit packed model; the message says what is wrong."""
