"""``python -m usp.plots``: see ``plots.cli``."""

import sys

from .cli import main

sys.exit(main())
