"""`python -m diffusers_diffae demo|encode|decode|reconstruct|interpolate|edit|sample|convert` (same as `diffae`)."""

import sys

from .cli import main


sys.exit(main())
