import numpy as np

from leaf_ray.config import TrainConfig
from leaf_ray.train.batching import Batching, batches_per_epoch, neighbour_batches


def test_neighbour_batches_recover_clusters_of_the_teacher_space():
    """Six tight clusters of 8 rows each, shuffled: each batch of 8 is one cluster, every row
    once."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32))
    cluster = rng.permutation(np.repeat(np.arange(6), 8))
    vectors = centres[cluster] + 0.05 * rng.normal(size=(48, 32))
    batches = neighbour_batches(vectors.astype(np.float32), 8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(48))
    assert [len(set(cluster[rows])) for rows in batches] == [1] * 6


def test_neighbour_batches_cover_every_row_when_the_window_is_not_a_multiple():
    vectors = np.random.default_rng(1).normal(size=(21, 4)).astype(np.float32)
    batches = neighbour_batches(vectors, 8)
    assert [len(rows) for rows in batches] == [8, 8, 5]
    assert sorted(np.concatenate(batches).tolist()) == list(range(21))


def test_neighbour_windows_set_the_micro_batches_per_epoch():
    """2 workers x 16 rows a step: windows of 2048 rows are 128 batches; 10,000 rows are 5,000
    a worker, two full windows and 904 rows (57 batches)."""
    cfg = TrainConfig(batch_size=32, batching="neighbours", neighbour_window=2048)
    batching = Batching.of(cfg, 10_000, 2)
    assert (batching.micro_batch, batching.window_batches) == (16, 128)
    assert batching.micro_per_epoch == 2 * 128 + 57 == batches_per_epoch(5000, 16, 128)
    assert Batching.of(TrainConfig(batch_size=32), 10_000, 2).window_batches == 16
