"""The ``gemini-sim`` command line: one module per verb (``replay``, ``fit``, ``placement``, ``interleave``,
``validate``, ``plan``, ``sweep``, ``synth``), each with its ``HELP``, ``add_arguments(parser)`` and ``run(args)``;
a new verb is a new module listed in :data:`VERBS`.

Every user mistake ends as one line on stderr, ``gemini-sim: error: ...``, and exit code 2.
"""

from __future__ import annotations

import sys

from gemini_sim.cli import fit, interleave, placement, plan, replay, sweep, synth, validate
from gemini_sim.cli.common import Parser
from gemini_sim.errors import UserError

VERBS = {"replay": replay, "fit": fit, "placement": placement, "interleave": interleave, "validate": validate,
         "plan": plan, "sweep": sweep, "synth": synth}


def build_parser() -> Parser:
    parser = Parser(prog="gemini-sim", description="Simulate in-memory checkpointing and failure recovery "
                                                   "(GEMINI, SOSP 2023).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, verb in VERBS.items():
        p = sub.add_parser(name, help=verb.HELP)
        verb.add_arguments(p)
        p.set_defaults(func=verb.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"gemini-sim: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the disk, not the user: one line, and exit code 1
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gemini-sim: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gemini-sim: interrupted", file=sys.stderr)
        return 130
