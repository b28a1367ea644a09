"""``python -m lowbit`` (and ``torchrun ... -m lowbit train ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
