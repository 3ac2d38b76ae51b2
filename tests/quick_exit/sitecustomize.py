"""Imported at start-up by every Python process the tests start (conftest.py puts this folder first on their
PYTHONPATH), the torchrun agents and training workers of the runtime's jobs among them.

At exit, the process's objects are moved out of the garbage collector's reach (``gc.freeze``), so the interpreter's
last collections do not walk the ~250,000 objects that importing torch creates. Measured on the 2-core CI host: a
process that had imported torch, FSDP and DCP spent about 0.7 s of CPU exiting on an idle host (1.2-2.1 s of wall time
beside a running test suite), 0.1-0.2 s with this (0.3-0.4 s of wall time); a 4-machine job of the fault matrix ends
8 such processes. Nothing a process owes its outputs is skipped: objects are still freed as
their references go, and the runtime closes (and renames) every file it writes before the process exits. A file left
to the final garbage collection to flush would show up as a failing test, not a passing one.
"""

import atexit
import gc
import importlib.machinery
import importlib.util
import os
import sys

atexit.register(gc.freeze)

# the sitecustomize this folder hides (a distribution's, say) still runs
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
