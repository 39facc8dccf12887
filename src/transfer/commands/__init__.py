"""The `transfer` command's subcommands, one module each: `COMMAND`, `COMMAND_HELP`, `COMMAND_DESCRIPTION`,
`add_arguments(parser)` and `run(args)`, thin shells over the library (transfer.cli builds the parsers)."""
