"""``python -m vmem``: the same as the ``vmem`` console script."""

import sys

from vmem.main import main

sys.exit(main())
