"""The `transfer` command: what a user runs after (or around) the pipeline.

Each sub-command is a module of transfer.commands that declares it: `COMMAND` (its name),
`COMMAND_HELP` (the line `transfer --help` shows), `COMMAND_DESCRIPTION`, `add_arguments(parser)` and
`run(args)`; this module builds the parsers from them and only dispatches. Heavy imports stay inside the
`run` functions, so `transfer --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from transfer import __version__
from transfer.pipeline.errors import UserError, configure_logging

# The modules that declare a command, in the order `transfer --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "transfer.commands.predict",
    "transfer.commands.promote",
    "transfer.commands.export",
    "transfer.commands.compare",
    "transfer.commands.report",
    "transfer.commands.tune",
    "transfer.commands.lr_find",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"transfer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        command = subparsers.add_parser(
            module.COMMAND, help=module.COMMAND_HELP, description=module.COMMAND_DESCRIPTION
        )
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"transfer {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"transfer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
