"""What the cache's trust check costs at the Kaggle dataset's size: a stat per file vs hashing every file.

Writes 5,856 files of ~1.2 GB in total to a temporary folder, then times the two checks
(:meth:`pneumo.data.storage.cache._Cache.trusted` takes the stat path unless a file's stat moved).
Run: ``.venv/bin/python benchmarks/cache_trust.py [files] [total_bytes]``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from pneumo.data.storage.cache import _md5_file


def main(files: int = 5856, total: int = 1_200_000_000) -> None:
    size = total // files
    blob = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="pneumo-cache-trust-") as folder:
        paths = [Path(folder) / f"{index}.jpeg" for index in range(files)]
        for index, path in enumerate(paths):
            path.write_bytes(blob[index % 97:] + blob[:index % 97])  # distinct contents
        started = time.perf_counter()
        for path in paths:
            path.stat()
        stat_s = time.perf_counter() - started
        started = time.perf_counter()
        for path in paths:
            _md5_file(path)
        md5_s = time.perf_counter() - started
    print(f"{files} files, {total / 1e9:.2f} GB: stat all {stat_s:.3f} s; MD5 all {md5_s:.2f} s (warm page cache)")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
