"""`python -m gptlab ...` is the same as the `gptlab` command (and what torchrun launches)."""

import sys

from gptlab.cli import main

sys.exit(main())
