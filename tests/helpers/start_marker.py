"""Imported only by the fork server of ``tests/test_warmstart.py``: records who imported it."""

import os

IMPORTED_BY = os.getpid()
