"""``python -m rho_fused``: the ``rho-fused`` command."""

import sys

from .cli import main

sys.exit(main())
