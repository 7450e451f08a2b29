"""Dataset sources (``s3://`` or a local folder): list, fingerprint, and cache incrementally and safely.

Three entry points:

* :func:`sync` lists a source, keeps the Kaggle layout's images (:func:`pneumo.layout.classify`,
  the same rule as the local manifest) and downloads new or changed objects in parallel into a
  local cache. It returns the manifest, a content fingerprint and a report.
* :func:`materialize` fetches exactly the objects a pinned manifest names (``If-Match`` on each
  pinned ETag) on a remote worker, so training never sees a dataset other than the one ingested;
  :func:`materialized` does the same and holds the files (shared cache lock) while they are read.
* :func:`upload_tree` seeds a bucket from a local folder (``pneumo synth s3://...``).

Modules, one job each: :mod:`.sources` (URIs, redaction, unsafe keys), :mod:`.keys` (which listed
keys are images: folder markers, Unicode spellings), :mod:`.report` (manifest, fingerprint,
reports), :mod:`.cache` (the on-disk cache state and its lock, :func:`reading`), :mod:`.s3` (the
only module that imports boto3/botocore), :mod:`.transfer` (list, verified download),
:mod:`.parallel` (thread pool), :mod:`.local` (local folders), :mod:`.ingest` (sync, materialize),
:mod:`.upload` (upload_tree). What users can rely on is in docs/storage.md.
"""

from pneumo.storage.cache import META_DIR, STATE_VERSION, cache_dir, reading
from pneumo.storage.ingest import materialize, materialized, sync
from pneumo.storage.keys import FOLDER_MARKER, UNICODE_DUPLICATE
from pneumo.storage.parallel import DEFAULT_WORKERS, ProgressFn
from pneumo.storage.report import (
    MANIFEST_COLUMNS,
    IngestReport,
    IngestResult,
    UploadReport,
    counts_by,
    fingerprint,
)
from pneumo.storage.sources import Source, parse_source, redact, unsafe_reason
from pneumo.storage.upload import upload_tree

__all__ = [
    "DEFAULT_WORKERS",
    "FOLDER_MARKER",
    "MANIFEST_COLUMNS",
    "META_DIR",
    "STATE_VERSION",
    "UNICODE_DUPLICATE",
    "IngestReport",
    "IngestResult",
    "ProgressFn",
    "Source",
    "UploadReport",
    "cache_dir",
    "counts_by",
    "fingerprint",
    "materialize",
    "materialized",
    "parse_source",
    "reading",
    "redact",
    "sync",
    "unsafe_reason",
    "upload_tree",
]
