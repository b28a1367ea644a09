"""``python -m lowbit`` (and ``torchrun ... -m lowbit train ...``): the command line."""

from .cli import run

run()
