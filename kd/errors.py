"""Errors the CLI prints as one clear message (exit status 2 for bad input, 1 for a failed run), never a traceback."""


class KDError(Exception):
    """An expected way for a run to end badly; the message says what happened and what to do."""


class UserError(KDError):
    """Bad input (config, data, paths): the message names the file or key and what is wrong."""


class ConfigError(UserError):
    """An unknown, mistyped or out-of-range config key."""


class DataError(UserError):
    """A dataset that cannot be used as given (missing files, one class, leakage, ...)."""


class Diverged(KDError):
    """Training produced a non-finite loss."""


class Interrupted(KDError):
    """A run stopped by the user (Ctrl-C, SIGTERM) after saving what it had; it can be resumed."""
