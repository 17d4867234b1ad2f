"""The grain pipeline: documents -> shuffled, packed rows of L tokens -> B anchors per row -> batches.

Deterministic from a seed: epoch e packs the documents in the order of a permutation seeded by
(seed, e), concatenated and cut into rows of L tokens (remainder dropped, no cross-document
masking, as in the paper); anchors are drawn per row with grain's per-index seeded random_map.
Everything is a grain MapDataset, so the iterator state is one index and checkpoints cheaply.
"""
from __future__ import annotations

import functools
import os

import grain
import numpy as np

from orthrus_jax.config import ConfigError
from train.anchors import sample_anchors  # noqa: F401  (also re-exported)


class DocSource(grain.sources.RandomAccessDataSource):
    """Documents written by train.make_data: {"tokens": int32[n], "mask": uint8[n]} by index."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.tokens = np.load(os.path.join(data_dir, "tokens.npy"), mmap_mode="r")
        self.mask = np.load(os.path.join(data_dir, "mask.npy"), mmap_mode="r")
        self.offsets = np.load(os.path.join(data_dir, "offsets.npy"))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return {"tokens": np.asarray(self.tokens[lo:hi]), "mask": np.asarray(self.mask[lo:hi])}

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __repr__(self) -> str:
        return f"DocSource({self.data_dir!r})"


class PackedRows(grain.sources.RandomAccessDataSource):
    """Rows of seq_len tokens: row r of epoch e cuts the (seed, e)-shuffled document stream."""

    def __init__(self, docs: DocSource, seq_len: int, seed: int, epochs: int):
        self.docs, self.seq_len, self.seed, self.epochs = docs, seq_len, seed, epochs
        self.doc_lengths = docs.lengths()
        self.rows_per_epoch = int(self.doc_lengths.sum()) // seq_len
        if self.rows_per_epoch == 0:
            raise ConfigError(f"data_dir {docs.data_dir}: fewer than seq_len={seq_len} tokens in all")

    def __len__(self) -> int:
        return self.rows_per_epoch * self.epochs

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_lengths))
        starts = np.r_[0, np.cumsum(self.doc_lengths[order])]
        return order, starts

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, row = divmod(int(index), self.rows_per_epoch)
        order, starts = self._epoch(epoch)
        lo, hi = row * self.seq_len, (row + 1) * self.seq_len
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        toks, mask, pos = [], [], lo
        j = first
        while pos < hi:
            doc = self.docs[int(order[j])]
            a, b = pos - starts[j], min(hi, starts[j + 1]) - starts[j]
            toks.append(doc["tokens"][a:b]); mask.append(doc["mask"][a:b])
            pos = starts[j] + b
            j += 1
        return {"tokens": np.concatenate(toks).astype(np.int32),
                "mask": np.concatenate(mask).astype(bool)}

    def __repr__(self) -> str:
        return f"PackedRows({self.docs!r}, L={self.seq_len}, seed={self.seed})"


def make_dataset(data_dir: str, seq_len: int, anchors_per_row: int, block_size: int,
                 rows_per_batch: int, seed: int, epochs: int,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Batches {"tokens" [R, L], "mask" [R, L], "anchors" [R, B], "anchor_valid" [R, B]}."""
    rows = PackedRows(DocSource(data_dir), seq_len, seed, epochs)

    def add_anchors(row, rng):
        anchors, valid = sample_anchors(row["mask"], anchors_per_row, block_size, rng)
        return {**row, "anchors": anchors, "anchor_valid": valid}

    # anchors are seeded by the global row index (random_map before the per-process slice), so
    # the rows of a global batch and their anchors do not depend on the number of processes
    ds = grain.MapDataset.source(rows).random_map(add_anchors, seed=seed)
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.batch(rows_per_batch, drop_remainder=True)


def num_batches(data_dir: str, seq_len: int, rows_per_batch: int, epochs: int) -> int:
    docs = DocSource(data_dir)
    return (int(docs.lengths().sum()) // seq_len) * epochs // rows_per_batch
