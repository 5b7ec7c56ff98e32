"""``python -m amct_core.verify``: the verify command (:mod:`amct_core.verify.cli`)."""
import sys

from .cli import main

sys.exit(main())
