"""`fob` sub-commands, one module each: every module defines `register(subparsers)` and sets
`func(args) -> int` on its parser. Modules are listed in FoBSegmentLib.cli.COMMAND_MODULES."""
