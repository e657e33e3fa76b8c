"""`python -m toolkit.plan` (the same as `toolkit plan`)."""

import sys

from toolkit.plan.cli import main

sys.exit(main())
