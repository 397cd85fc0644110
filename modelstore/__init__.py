"""modelstore: keep many fine-tuned models of one pre-trained model cheaply, load any of them fast.

>>> import modelstore
>>> store = modelstore.build("store", "models/bert-base", {"sst2": "ft/sst2"}, keep=0.1)
>>> sd = modelstore.open("store").load("sst2", device="cuda")
>>> modelstore.open("store").switch(model, "sst2")   # a resident model, in place, O(changed entries)
"""

__version__ = "0.1.0"  # the one version source (pyproject.toml reads it)

from . import stats
from .api import add_lora_task, add_task, load, remove_task
from .api import open_store as open  # noqa: A004
from .build import build, init
from .commits import UncertainCommit
from .errors import (ConflictError, CorruptStoreError, FormatVersionError, InputError, ModelStoreError,
                     SingleWriterWarning, StorageError, StoreNotFoundError, TaskExistsError, TaskNotFoundError)
from .hf_models import load_model
from .kinds import StoredAdapter
from .lora import LoraError
from .merging import merge
from .storage.leases import PayloadLostError
from .store import Store
from .transfer import SyncReport, sync


__all__ = [
    "open", "load", "load_model", "build", "init", "add_task", "add_lora_task", "remove_task", "merge", "sync", "stats",
    "Store", "StoredAdapter", "SyncReport",
    "ModelStoreError", "InputError", "StoreNotFoundError", "FormatVersionError", "TaskNotFoundError",
    "TaskExistsError", "PayloadLostError", "CorruptStoreError", "ConflictError", "StorageError", "UncertainCommit", "LoraError", "SingleWriterWarning",
]
