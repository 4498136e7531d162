import numpy as np
import pytest

from leaf_ray.cli import DEFAULT_CONFIG
from leaf_ray.config import TrainConfig, load_config
from leaf_ray.run import RunError
from leaf_ray.train.batching import Batching, batches_per_epoch, neighbour_batches
from leaf_ray.train.trainer import train_student


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


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_every_row_of_a_step_weighs_the_same(accumulation):
    """100 rows a worker in micro-batches of 16: six full ones, then the short one (4 rows) the
    epoch ends with. Each step's micro-batch weights sum to 1 and give each row the same share,
    in the epoch's last step too."""
    cfg = TrainConfig(batch_size=32 * accumulation, grad_accumulation=accumulation, num_workers=2)
    batching = Batching.of(cfg, 200, 2)
    sizes = [batching.micro_batch] * (batching.micro_per_epoch - 1) + [batching.last_rows]
    assert sizes == [16] * 6 + [4]
    steps = [
        range(i, min(i + accumulation, len(sizes))) for i in range(0, len(sizes), accumulation)
    ]
    assert len(steps) == batching.steps_per_epoch
    for step in steps:
        weights = [batching.loss_weight(i, sizes[i]) for i in step]
        assert sum(weights) == pytest.approx(1.0)
        per_row = [weight / sizes[i] for weight, i in zip(weights, step, strict=True)]
        assert per_row == pytest.approx([1 / sum(sizes[i] for i in step)] * len(step))


def test_fewer_training_texts_than_workers_are_refused_before_ray():
    """Two workers and one text: one worker would train on nothing while the other steps."""
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.train.num_workers == 2
    with pytest.raises(RunError, match="1 training text.*num_workers=2"):
        train_student(cfg, embedded=None, num_rows=1, init=None, storage=None)
