"""The CLI run in-process for the bad-input tests: exit status and printed text."""

from __future__ import annotations

import pytest

from lowbit import cli


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Exit status and printed text on one line (a console wide enough that rich does not wrap)."""
    capsys.readouterr()
    was = cli.console._width
    cli.console.width = 10_000
    try:
        rc = cli.main(["--threads", "1", *args])
    finally:
        cli.console._width = was
    return rc, capsys.readouterr().out.strip()
