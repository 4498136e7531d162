"""Row selection: which texts the teacher embeds, how often each source's texts are seen, which
are held out, decided over 16-byte keys."""

from __future__ import annotations

import itertools

import numpy as np

from leaf_ray.data.selection import RANGE_KEYS, decide, key_ranges
from leaf_ray.hashing import HASH_DTYPE, text_hashes

PARAMS = {"weights": [2.0, 0.5, 1.0], "seed": 0, "held": 0, "fit": 0}


def keys(*names: str) -> np.ndarray:
    return text_hashes(["query"] * len(names), names)


def no_cache() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, HASH_DTYPE), np.empty(0, np.int32)


def test_mixture_weights_set_how_often_each_source_is_seen():
    # Source 0: 4 texts at weight 2; source 1: 10 texts at 0.5 (one also in source 0); 2: 3 at 1.
    names = ["a", "b", "c", "d"] + ["a"] + [f"h{i}" for i in range(9)] + ["x", "y", "z"]
    hashes, sources = keys(*names), np.array([0] * 4 + [1] * 10 + [2] * 3)
    summary, _, (distinct, counts, _), _, repeated = decide(hashes, sources, *no_cache(), PARAMS)
    times = dict(zip(distinct.tolist(), counts.tolist(), strict=True))
    assert list(distinct) == sorted(distinct)
    assert [times[h] for h in keys(*"abcd")] == [2, 2, 2, 2]  # "a" keeps its first source's
    assert [times[h] for h in keys(*"xyz")] == [1, 1, 1]
    halves = [times.get(h, 0) for h in keys(*(f"h{i}" for i in range(9)))]
    assert sorted(halves) == [0] * 5 + [1] * 4  # exactly round(0.5 x 9) = 4 of them, once each
    training = summary["training"]
    assert (training["texts"], training["rows"], training["repeated"]) == (11, 15, 1)
    lo, hi = (bytes(k).ljust(16, b"\0") for k in (distinct[0], distinct[-1]))
    assert training["ranges"] == [(lo, hi)]
    assert repeated.tolist() == keys("a").tolist()  # two rows hold it: read once

    def counted(order: np.ndarray, seed: int = 0) -> list:
        chosen = decide(hashes[order], sources[order], *no_cache(), PARAMS | {"seed": seed})[2]
        return list(zip(chosen[0].tolist(), chosen[1].tolist(), strict=True))

    same = np.arange(len(names))
    shuffled = np.random.default_rng(3).permutation(len(names))  # rows in another order
    assert counted(same) == counted(shuffled) == sorted(times.items())  # every worker agrees
    assert counted(same, seed=1) != counted(same)  # another seed, another half


def test_held_out_and_fit_texts_are_the_lowest_keys_of_every_source():
    names = [f"text {i}" for i in range(400)]
    hashes, sources = keys(*names), np.arange(400) // 200  # two sources, one after the other
    params = PARAMS | {"weights": [1.0, 1.0], "held": 25, "fit": 60}
    summary, _, training, (lowest, _, _), _ = decide(hashes, sources, *no_cache(), params)
    assert summary["held"] == 25 and lowest.tolist() == np.sort(hashes)[:85].tolist()
    assert training[0].tolist() == np.sort(hashes)[25:].tolist()  # all but the held-out ones
    by_key = dict(zip(hashes.tolist(), sources.tolist(), strict=True))
    assert {by_key[k] for k in lowest[:25].tolist()} == {0, 1}  # validation: both sources
    assert {by_key[k] for k in lowest[25:].tolist()} == {0, 1}  # the fit sample too
    small = decide(hashes[:50], sources[:50], *no_cache(), params)[0]
    assert small["held"] == 5  # at most a tenth of the texts


def test_the_cache_is_looked_up_by_key_and_each_text_read_from_its_first_copy():
    hashes, sources = keys("a", "b", "c", "d"), np.zeros(4, np.int64)
    cached = keys("b", "d", "b", "e")  # "b" in shards 2 and 0: read order picks 0
    shards = np.array([2, 1, 0, 3], np.int32)
    summary, (todo, _, _), (training, _, first_in), _, _ = decide(
        hashes, sources, cached, shards, PARAMS | {"weights": [1.0]}
    )
    assert todo.tolist() == sorted(keys("a", "c").tolist())
    assert summary["duplicated"] == 1 and summary["todo"]["texts"] == 2
    shard_of = dict(zip(training.tolist(), first_in.tolist(), strict=True))
    assert shard_of == {keys(k)[0]: s for k, s in (("a", -1), ("b", 0), ("c", -1), ("d", 1))}
    assert summary["first_missing"] == min(keys("a", "c").tolist()).ljust(16, b"\0")


def test_keys_are_cut_into_consecutive_ranges_a_reading_task_each():
    keys = np.sort(text_hashes(["query"] * 10_000, [f"t{i}" for i in range(10_000)]))
    ranges = key_ranges(keys)
    assert len(ranges) == -(-10_000 // RANGE_KEYS[0])  # the smallest range: many tasks
    whole = [bytes(k).ljust(16, b"\0") for k in keys]  # numpy drops trailing zero bytes
    assert [lo for lo, _ in ranges] == whole[:: RANGE_KEYS[0]]
    assert ranges[-1][1] == whole[-1]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    assert key_ranges(keys[:0]) == []
