"""`python -m toolkit.plan` (the same as `toolkit plan`)."""

import sys

from toolkit.commands.plan import main

sys.exit(main())
