"""Dataset sources (``s3://`` or a local folder): list, fingerprint, and cache incrementally and safely.

:func:`sync` caches a source's images and describes them; :func:`materialize` / :func:`materialized`
fetch exactly what a pinned manifest names (``If-Match`` on each ETag); :func:`upload_tree` seeds a
bucket; :func:`list_images` lists a source without downloading and :func:`manifest_changes` says what
differs between two manifests (the dataset watch). What users can rely on is in docs/storage.md.
"""

from pneumo.data.storage.cache import LOCK_TIMEOUT_ENV, META_DIR, STATE_VERSION, cache_dir, lock_timeout, reading
from pneumo.data.storage.ingest import list_images, materialize, materialized, sync
from pneumo.data.storage.keys import FOLDER_MARKER, UNICODE_DUPLICATE
from pneumo.data.storage.report import (
    MANIFEST_COLUMNS, IngestReport, IngestResult, UploadReport, counts_by, fingerprint, manifest_changes
)
from pneumo.data.storage.sources import Source, parse_source, unsafe_reason
from pneumo.data.storage.transfer import DEFAULT_WORKERS, ProgressFn, upload_tree
from pneumo.errors import redact

__all__ = [
    "DEFAULT_WORKERS", "FOLDER_MARKER", "LOCK_TIMEOUT_ENV", "MANIFEST_COLUMNS", "META_DIR", "STATE_VERSION",
    "UNICODE_DUPLICATE", "IngestReport", "IngestResult", "ProgressFn", "Source", "UploadReport", "cache_dir",
    "counts_by", "fingerprint", "list_images", "lock_timeout", "manifest_changes", "materialize", "materialized",
    "parse_source", "reading", "redact", "sync", "unsafe_reason", "upload_tree",
]
