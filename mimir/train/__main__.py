"""`python -m mimir.train ...` (what `accelerate launch -m mimir.train` runs): the same as `mimir train`."""

import sys

from .commands import main_train

sys.exit(main_train())
