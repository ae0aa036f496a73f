"""The `dvp` command line: entry point, commands and the combined configuration."""
