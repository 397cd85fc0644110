"""modelstore: keep many fine-tuned models of one pre-trained model cheaply, load any of them fast.

>>> import modelstore
>>> store = modelstore.build("store", "models/bert-base", {"sst2": "ft/sst2"}, keep=0.1)
>>> sd = modelstore.open("store").load("sst2", device="cuda")
>>> modelstore.open("store").switch(model, "sst2")   # a resident model, in place, O(changed entries)
"""

__version__ = "0.1.0"  # the one version source (pyproject.toml reads it)

from modelstore.api import add_lora_task, add_task, load, remove_task
from modelstore.api import open_store as open  # noqa: A004
from modelstore.build import build, init
from modelstore.errors import (
                     ConflictError,
                     CorruptStoreError,
                     FormatVersionError,
                     InputError,
                     ModelStoreError,
                     SingleWriterWarning,
                     StorageError,
                     StoreNotFoundError,
                     TaskExistsError,
                     TaskNotFoundError,
)
from modelstore.fidelity import Calibration
from modelstore.kinds import StoredAdapter
from modelstore.kinds.lora import LoraError
from modelstore.merging import merge
from modelstore.merging import statistics as stats
from modelstore.serving.hf_models import load_model
from modelstore.storage.commits import UncertainCommit
from modelstore.storage.leases import PayloadLostError
from modelstore.storage.transfer import SyncReport, sync
from modelstore.store import Store

__all__ = [
    "open", "load", "load_model", "build", "init", "add_task", "add_lora_task", "remove_task", "merge", "sync", "stats",
    "Store", "StoredAdapter", "SyncReport", "Calibration",
    "ModelStoreError", "InputError", "StoreNotFoundError", "FormatVersionError", "TaskNotFoundError",
    "TaskExistsError", "PayloadLostError", "CorruptStoreError", "ConflictError", "StorageError", "UncertainCommit",
    "LoraError", "SingleWriterWarning",
]
