"""The learning-rate schedule, and what the trainers hold next to the teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leaf_ray.config import LeafConfig
from leaf_ray.train.resources import gpus_per_trainer


def test_schedule_restarts_each_cycle_and_decays_to_the_final_ratio(tmp_path):
    from leaf_ray.config import TrainConfig
    from leaf_ray.train.schedule import leaf_schedule

    cfg = TrainConfig(epochs=3, cycles=3, lr=1.0, warmup_ratio=0.2, final_lr_ratio=0.1)
    encoder, head = (torch.nn.Parameter(torch.zeros(1)) for _ in range(2))
    optimizer = torch.optim.SGD([{"params": [encoder]}, {"params": [head]}], lr=1.0)
    schedule = leaf_schedule(optimizer, 30, cfg)
    rates = []
    for _ in range(30):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    cycles = [rates[0:10], rates[10:20], rates[20:30]]
    assert cycles[0] == cycles[1] == cycles[2]  # restarts: every cycle is the same
    first = cycles[0]
    assert first[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warm-up: 20% of 10 steps
    assert first[-1] == pytest.approx(0.1)  # each cycle ends at lr x final_lr_ratio
    assert np.diff(first[2:]) == pytest.approx(np.full(7, (0.1 - 1.0) / 7))


@pytest.mark.parametrize(
    ("train", "teacher", "cluster_gpus", "per_trainer"),
    [
        ({}, {}, 0, 0.0),
        ({}, {}, 1, 1.0),  # cached: the stages run one after the other, each on whole GPUs
        ({"data_mode": "streaming"}, {}, 1, 0.5),  # one GPU: the teacher takes the other half
        ({"data_mode": "streaming", "num_workers": 8}, {}, 8, 0.5),
        ({"data_mode": "streaming", "num_workers": 4}, {}, 8, 1.0),  # 4 GPUs left to the teacher
        ({"data_mode": "streaming"}, {"http": {"url": "http://h/v1"}}, 1, 1.0),  # needs no GPU
        ({"data_mode": "streaming", "use_gpu": False}, {}, 1, 0.0),
    ],
)
def test_streaming_trainers_leave_the_teacher_half_of_each_gpu(
    train, teacher, cluster_gpus, per_trainer
):
    cfg = LeafConfig.model_validate(
        {
            "data": {"sources": [{"path": "texts.jsonl"}]},
            "teacher": {"model": "m", **teacher},
            "student": {"init": "pretrained", "model": "s"},
            "train": {"batch_size": 32, **train},
        }
    )
    assert gpus_per_trainer(cfg, cluster_gpus) == per_trainer
