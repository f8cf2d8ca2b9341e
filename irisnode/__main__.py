"""``python -m irisnode`` runs the same command as ``irisnode``."""

import sys

from irisnode.cli import main

sys.exit(main())
