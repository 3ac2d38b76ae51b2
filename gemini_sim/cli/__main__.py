"""``python -m gemini_sim.cli``: the same as the ``gemini-sim`` command."""

import sys

from gemini_sim.cli import main

sys.exit(main())
