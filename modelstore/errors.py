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




class CorruptStoreError(ModelStoreError):
    """Stored bytes fail their checksum or the metadata is inconsistent."""


class ConflictError(ModelStoreError):
    """Another writer changed the store in a way this write cannot be re-applied over."""


class TaskExistsError(ConflictError):
    """A task of that name exists (perhaps just added by another writer) and overwrite was not asked for."""


class StorageError(ModelStoreError):
    """The store's location could not be read or written (an outage, permissions, a stuck lock)."""


class SingleWriterWarning(UserWarning):
    """The store's filesystem has no conditional write, so only one writer may use it at a time."""


def is_io_error(e: BaseException) -> bool:
    """Whether `e` is a failure to reach or use storage (an outage, a refused connection, a timeout,
    permissions), as opposed to damaged bytes: OSError and the HTTP clients' transport errors,
    recognised by class name so that no client library needs importing."""
    if isinstance(e, (OSError, ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"BotoCoreError", "ClientError", "ClientConnectionError", "ClientConnectorError",
                         "ServerDisconnectedError", "HTTPError", "ConnectError", "TransportError", "HfHubHTTPError",
                         "ClientPayloadError"})
