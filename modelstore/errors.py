"""Exceptions users can catch; every message is one line that says what to do."""


class ModelStoreError(Exception):
    """Base class of every error modelstore raises on purpose."""


class InputError(ModelStoreError, ValueError):
    """A checkpoint, option or name given by the user is unusable."""


class StoreNotFoundError(ModelStoreError):
    """The location holds no modelstore store."""


class FormatVersionError(ModelStoreError):
    """The store was written by a newer format version than this reader knows."""


class TaskNotFoundError(ModelStoreError, KeyError):
    """The store has no task of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TaskExistsError(ModelStoreError):
    """A task of that name exists and overwrite was not asked for."""


class CorruptStoreError(ModelStoreError):
    """Stored bytes fail their checksum or the metadata is inconsistent."""
