"""The `dvp` subcommands, one module per group.

Each module defines `COMMANDS: dict[name, (help, computes, add_arguments, run)]` where
`add_arguments(parser)` adds the command's own options and `run(args, config) -> int` does the
work. A command is registered here once it works.
"""

from streamer.commands import assets, generator_cmds, live, renderer_cmds, tracker_cmds

COMMANDS = [assets, generator_cmds, live, renderer_cmds, tracker_cmds]
