"""Errors the CLI reports to the admin as one line."""


class OpieError(Exception):
    """A failure the admin should read as one line; exit code 1."""

    exit_code = 1


class UsageError(OpieError):
    """Bad input on the command line; nothing was changed. Exit code 2."""

    exit_code = 2
