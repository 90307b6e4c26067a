"""`python -m blackbox_zo ...` (what `torchrun -m blackbox_zo` launches)."""

import sys

from .cli import main

sys.exit(main())
