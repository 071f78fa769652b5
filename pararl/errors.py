"""Errors that several packages raise and the CLI turns into one clear line and exit code 2."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""
