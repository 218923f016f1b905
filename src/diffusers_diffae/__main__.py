"""`python -m diffusers_diffae <command> ...`: the `diffae` command (`python -m diffusers_diffae --help` lists them)."""

import sys

from .cli import main


sys.exit(main())
