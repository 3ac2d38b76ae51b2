"""The fault matrix on TorchTitan's Llama 3 (examples/titan: its debug model, its own FSDP2 parallelisation, AdamW
and a warm-up schedule), on the CPU build. TorchTitan is an extra of its own: `make test-titan` installs it in a venv
of its own and runs this module; where it is not installed (`make test`), the module is skipped."""

import importlib.util

import pytest

from fault_matrix import *  # noqa: F401,F403 - the matrix's tests and fixtures run here
from conftest import needs_fsdp

pytestmark = [needs_fsdp, pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                                             reason="TorchTitan is not installed (make test-titan installs it)")]

SCRIPT = "examples/titan/train.py"
SCRIPT_ARGS = ("--deterministic",)
