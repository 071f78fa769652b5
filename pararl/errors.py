"""Errors that several packages raise and the CLI turns into one clear line and exit code 2."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason in its inputs (a reward model, the data): the message says
    which and what was kept; the CLI prints it as one line and exits 2."""
