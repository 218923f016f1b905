"""`python -m diffusers_diffae.app` (the same as `diffae app`)."""

import sys

from . import main


sys.exit(main())
