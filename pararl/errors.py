"""The project's errors: one root, so the CLI can tell a problem in the user's inputs from a bug.

Every error a user can cause (a config value, a model folder, a checkpoint, a dataset record, a
reward model that misbehaves) is a ``PararlError``; the CLI prints it as one line and exits 2. Any
other exception is a bug in pararl or a library and keeps its traceback. The subclasses also derive
from the builtin that the old code raised, so ``except ValueError`` keeps working.
"""


class PararlError(Exception):
    """Root of the project's errors: the message names the problem and what was kept."""


class ConfigError(PararlError, ValueError):
    """A configuration that cannot run; the message names the key."""


class CheckpointError(PararlError, ValueError):
    """A model folder or checkpoint that is missing, incomplete or does not match what loads it."""


class DataError(PararlError, ValueError):
    """A dataset record or file that cannot be used (the message names the file and the record)."""


class RunError(PararlError, RuntimeError):
    """A run that cannot go on for a reason in its inputs (a reward model, the data, a dead actor): the
    message says which and what was kept."""
