"""The project's error base: a failure a user can act on, with a message that says what."""


class DvpError(Exception):
    """Base of every error the `dvp` CLI prints as 'dvp: error: MESSAGE' (exit code 1)."""
