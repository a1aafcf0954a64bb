"""The light stages of the Ray Data extraction: listing's ``stat`` and the Parquet sink.

They run in Ray worker processes of their own, one per concurrent task, started for every
job. This module imports only NumPy, pyarrow and cbir's light modules (``import cbir`` is
lazy), so such a worker starts in well under a second and a few tens of MB, instead of
paying PyTorch's import (seconds and ~1 GB) as a worker of the describing actors does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from cbir.distributed.deps import require
from cbir.distributed.embeddings import contains, key_digests, write_shard


def stat_files(batch: Any, done: np.ndarray, base: str) -> Any:
    """Add size and mtime_ns to each listed path (-1 for a missing file, which the describe
    stage reports) and drop the rows already written."""
    pa = require("pyarrow")
    paths, sizes, mtimes = [], [], []
    for raw in batch.column(0).to_pylist():
        line = raw.strip()
        if not line:
            continue
        path = os.path.abspath(os.path.join(base, line))
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        paths.append(path)
        sizes.append(size)
        mtimes.append(mtime)
    keep = ~contains(done, key_digests(paths, sizes, mtimes))
    return pa.table(
        {"path": pa.array(paths, pa.string()).filter(pa.array(keep)),
         "size": pa.array(sizes, pa.int64()).filter(pa.array(keep)),
         "mtime_ns": pa.array(mtimes, pa.int64()).filter(pa.array(keep))}
    )  # fmt: skip


def shard_sink_class() -> type:
    """The Datasink subclass (built on first use: Ray is an optional dependency)."""
    datasink = require("ray.data.datasource", "--ray").Datasink
    block_accessor = require("ray.data.block", "--ray").BlockAccessor

    class ShardSink(datasink):
        """Writes every block as one shard; collects (name, described, failed) per shard."""

        def __init__(self, shard_dir: str) -> None:
            self.shard_dir = shard_dir
            self.shards: list[tuple[str, int, int]] = []

        def write(self, blocks: Iterable[Any], ctx: Any) -> list[tuple[str, int, int]]:
            out = []
            for block in blocks:
                table = block_accessor.for_block(block).to_arrow()
                if table.num_rows:
                    described = table.column("error").null_count  # no error: described
                    out.append((write_shard(self.shard_dir, table), described, table.num_rows - described))
            return out

        def on_write_complete(self, write_result: Any) -> None:
            self.shards = [s for returns in write_result.write_returns for s in returns]

    return ShardSink
