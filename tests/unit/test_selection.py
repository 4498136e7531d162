"""Row selection: how often each source's texts are seen."""

from __future__ import annotations

import numpy as np

from leaf_ray.data.selection import mixture_counts


def test_mixture_weights_set_how_often_each_source_is_seen():
    # Source 0: 4 texts at weight 2; source 1: 10 texts at 0.5 (one also in source 0); 2: 3 at 1.
    hashes = np.array(["a", "b", "c", "d"] + ["a"] + [f"h{i}" for i in range(9)] + ["x", "y", "z"])
    sources = np.array([0] * 4 + [1] * 10 + [2] * 3)
    distinct, counts = mixture_counts(hashes, sources, [2.0, 0.5, 1.0], seed=0)
    times = dict(zip(distinct.tolist(), counts.tolist(), strict=True))
    assert list(distinct) == sorted(times)
    assert [times[h] for h in "abcd"] == [2, 2, 2, 2]  # "a" keeps its first source's weight
    assert [times[h] for h in "xyz"] == [1, 1, 1]
    halves = [times[f"h{i}"] for i in range(9)]
    assert sorted(halves) == [0] * 5 + [1] * 4  # exactly round(0.5 x 9) = 4 of them, once each
    again = mixture_counts(hashes, sources, [2.0, 0.5, 1.0], seed=0)[1]
    other = mixture_counts(hashes, sources, [2.0, 0.5, 1.0], seed=1)[1]
    assert again.tolist() == counts.tolist()  # seeded: every worker and rerun agrees
    shuffled = np.random.default_rng(3).permutation(len(hashes))  # rows in another order
    _, reordered = mixture_counts(hashes[shuffled], sources[shuffled], [2.0, 0.5, 1.0], seed=0)
    assert reordered.tolist() == counts.tolist()
    assert other.sum() == counts.sum()
