"""The command layer, on top of tracking and the library: the `transfer` command's subcommands, one module
each declaring `COMMAND`, `COMMAND_HELP`, `COMMAND_DESCRIPTION`, `add_arguments(parser)` and `run(args)`, thin
shells over the library (transfer.cli builds the parsers from them)."""
