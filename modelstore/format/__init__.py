"""The store format (spec/FORMAT.md): manifest records, path rules, codecs and payloads.

Everything that knows how bytes are laid out lives here; task kinds and the Store use it.
"""

from modelstore.format.manifest import (
                       FORMAT_NAME,
                       FORMAT_VERSION,
                       BaseEntry,
                       Manifest,
                       PayloadFields,
                       TableEntry,
                       TaskEntry,
                       check_manifest,
                       new_manifest,
                       now,
                       same_content,
                       table_digest,
)
from modelstore.format.paths import (
                       MANIFEST,
                       base_dir,
                       check_task_name,
                       new_payload_dir,
                       task_dir,
)
from modelstore.format.payload import PayloadReader, PayloadWriter, Segments

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "BaseEntry", "Manifest", "PayloadFields", "TableEntry", "TaskEntry",
           "check_manifest", "new_manifest", "now", "same_content", "table_digest", "MANIFEST", "base_dir",
           "check_task_name", "new_payload_dir", "task_dir", "PayloadReader", "PayloadWriter", "Segments"]
