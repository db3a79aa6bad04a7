"""``python -m keyreg.cli`` (used by ``torchrun -m keyreg.cli register ...``)."""

from . import entry

entry()
