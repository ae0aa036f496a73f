"""The `dvp` subcommands, one module per group.

Each module defines `COMMANDS: dict[name, (help, computes, add_arguments, run)]` (a name of
two words, such as "assets install", is a command of a group) where
`add_arguments(parser)` adds the command's own options and `run(args, config) -> int` does the
work. A command is registered here once it works.
"""

from streamer.cli.commands import (
    assets,
    demo,
    generator_cmds,
    live,
    prepare,
    renderer_cmds,
    tracker_cmds,
)

COMMANDS = [assets, tracker_cmds, renderer_cmds, prepare, generator_cmds, live, demo]
