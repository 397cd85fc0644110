"""modelstore: keep many fine-tuned models of one pre-trained model cheaply, load any of them fast.

>>> import modelstore
>>> store = modelstore.build("store", "bert-base", {"sst2": "ft/sst2"}, keep=0.1)
>>> sd = modelstore.open("store").load("sst2", device="cuda")
"""

from .pipeline import add_lora_task, add_task, build, init, remove_task
from .errors import (CorruptStoreError, FormatVersionError, InputError, ModelStoreError, StoreNotFoundError,
                     TaskExistsError, TaskNotFoundError)
from . import stats
from .merging import merge
from .store import Store, load
from .transfer import SyncReport, sync
from .store import open_store as open  # noqa: A004

__version__ = "0.1.0"

__all__ = [
    "open", "load", "build", "stats", "add_task", "add_lora_task", "init", "remove_task", "merge", "sync",
    "SyncReport", "Store",
    "ModelStoreError", "InputError", "StoreNotFoundError", "FormatVersionError", "TaskNotFoundError",
    "TaskExistsError", "CorruptStoreError",
]
