"""``python -m keyreg.cli`` (used by ``torchrun -m keyreg.cli register ...``)."""

import sys

from . import main

sys.exit(main())
