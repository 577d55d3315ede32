"""``python -m mergeflow``."""

import sys

from mergeflow.cli import main

sys.exit(main())
