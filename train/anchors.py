"""Anchor sampling for the dual-pass training rows (numpy only: no grain, so benchmarks on a bare
accelerator image can draw anchors as training does)."""
from __future__ import annotations

import numpy as np


def sample_anchors(mask: np.ndarray, num: int, block_size: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to num sorted anchors, without replacement, at response positions 1 <= a <= L - K.

    Returns (anchors int32[num], valid bool[num]); missing slots are anchor 1, invalid.
    """
    seq_len = mask.shape[0]
    cand = np.flatnonzero(mask[1: seq_len - block_size + 1]) + 1
    take = min(num, cand.size)
    anchors = np.ones(num, np.int32)
    valid = np.zeros(num, bool)
    if take:
        anchors[:take] = np.sort(rng.choice(cand, size=take, replace=False))
        valid[:take] = True
    return anchors, valid
