"""The ``mulambda`` command: one entry point, one subcommand per component.

Each subcommand lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; only the module of the subcommand named on the command
line is imported (for its options too), so ``mulambda models`` and
``mulambda simulate`` import neither kopf nor kubernetes, and the operator
never imports TensorFlow. Logging is set up (and imported) only once the
arguments parsed: ``--help`` stays fast (tests/unit/test_layout.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mulambda import __version__

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("mulambda.operator.main", "run the Kubernetes operator (kopf)"),
    "companion": ("mulambda.companion.main", "run the companion sidecar beside TF Serving"),
    "selector": ("mulambda.selector", "run the HTTP selector API"),
    "models": ("mulambda.tools.models", "push, list, remove models; create buckets (S3)"),
    "simulate": ("mulambda.tools.simulate", "replay a scenario through selectors and compare"),
    "ping": ("mulambda.companion.ping", "answer latency probes (sidecar of Client workloads)"),
    "explain": ("mulambda.tools.explain", "why a Client gets the executor it gets (ranking)"),
    "top": ("mulambda.tools.top", "watch the executors: replicas, state, load, latency"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (to add its options).

    For a known ``command`` only its subparser is built: parsing its
    arguments or printing its help needs no other (each costs gettext
    lookups); ``mulambda --help`` or an unknown command gets them all.
    """
    parser = argparse.ArgumentParser(prog="mulambda", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mulambda {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [command] if command in COMMANDS else list(COMMANDS)
    for name in names:
        module, help_text = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name != command:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError:  # a component not built into this install
            p.set_defaults(_missing=True)
            continue
        mod.configure(p)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if getattr(args, "_missing", False):
        print(f"mulambda: '{args.command}' is not available in this install", file=sys.stderr)
        return 2
    import logging

    from mulambda.settings import SettingsError, log_level

    try:
        logging.basicConfig(
            level=log_level(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        mod = importlib.import_module(args._module)
        return int(mod.run(args) or 0)
    except SettingsError as exc:  # a bad MULAMBDA_* variable: its name, not a traceback
        print(f"mulambda {args.command}: {exc}", file=sys.stderr)
        return 2
