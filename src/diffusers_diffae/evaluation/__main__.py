"""`python -m diffusers_diffae.evaluation ...`: see `suite.py`."""

from .suite import main


raise SystemExit(main())
