"""The exception types for user mistakes.

Anything the user can fix (a bad path, a malformed file, an impossible config) raises a subclass of
``UserError`` with a message that names the file, line or key and says what to do. The entry points
print that message on one line and exit non-zero; genuine bugs still raise normally with a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: printed as one line by the entry points, exit code 2."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an impossible value in the configuration."""


class DataError(UserError):
    """A missing, empty, binary or malformed input file, or a corrupt token shard."""


class CheckpointError(UserError):
    """A missing, corrupt or mismatched checkpoint."""


class DivergenceError(UserError):
    """Training that rollbacks could not bring back to finite, spike-free losses."""


class DiskFullError(UserError):
    """No space left (or the quota reached) where a file was being written."""
