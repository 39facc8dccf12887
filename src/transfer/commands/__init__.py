"""The command layer: `transfer` sub-commands, on top of tracking and the library."""
