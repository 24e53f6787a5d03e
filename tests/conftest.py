"""Shared test set-up: ``tests/`` on sys.path so that every test file, in any sub-folder, can import the
independent references of :mod:`ot_reference`."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
