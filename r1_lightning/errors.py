"""Errors caused by the user's input: the CLI prints their message (no traceback) and exits 1."""


class UserError(Exception):
    """Bad input: the message names the option, file, line or column at fault."""


class ConfigError(UserError, ValueError):
    """A wrong option value or a missing model/checkpoint path."""
