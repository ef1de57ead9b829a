"""``python -m usp.plots``: see ``usp.plots.cli``."""

import sys

from .cli import main

sys.exit(main())
