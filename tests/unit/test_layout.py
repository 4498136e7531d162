"""The teacher stage's layout on a cluster: what each actor reserves, tokenizer actors."""

from __future__ import annotations

import pytest

from leaf_ray.cluster import cpu_share, torch_threads
from leaf_ray.config import ConfigError, TeacherConfig
from leaf_ray.teacher.layout import StageLayout, stage_layout


@pytest.mark.parametrize(
    ("node_cpus", "actors", "share"),
    [
        ([2], 1, (1.0, 2)),  # this machine: one CPU left to Ray Data's tasks
        ([16, 16], 1, (15.0, 16)),  # one actor fits one node, not the cluster's 30 CPUs
        ([16, 16], 2, (15.0, 16)),
        ([16, 16], 8, (3.75, 4)),
        ([8, 2], 2, (4.0, 5)),
    ],
)
def test_cpu_actors_reserve_what_one_node_can_give(node_cpus, actors, share):
    free = sum(node_cpus)
    reserved = cpu_share(free, node_cpus, actors, keep_per_node=1)  # one CPU a node for Ray Data
    assert (reserved, torch_threads(free, node_cpus, actors)) == share


@pytest.mark.parametrize(
    ("free", "node_cpus", "teacher", "num_rows", "layout"),
    [
        # One H100 box: 14 tokenizer actors, the teacher's thread only feeds the GPU; calls of
        # 16 batches, each gathered from 8 tokenizer blocks.
        ({"CPU": 16, "GPU": 1}, [16], {}, None, StageLayout(1.0, 1.0, 1, 14, 1024, 128)),
        ({"CPU": 16, "GPU": 1}, [16], {}, 300, StageLayout(1.0, 1.0, 1, 14, 300, 64)),
        # No CPU to spare (streaming on a small box): the teacher actor tokenizes.
        ({"CPU": 2, "GPU": 1}, [2], {}, None, StageLayout(1.0, 1.0, 1, 0, 1024, 1024)),
        (
            {"CPU": 32, "GPU": 16},
            [16, 16],
            {"num_actors": 16},
            None,
            StageLayout(1.0, 1.0, 1, 14, 1024, 128),
        ),
        (
            {"CPU": 16, "GPU": 1},
            [16],
            {"tokenizer_actors": 0},
            None,
            StageLayout(1.0, 1.0, 15, 0, 1024, 1024),
        ),
        # CPUs: the actors tokenize, in calls of 128 batches, or fewer to give each actor work.
        ({"CPU": 2}, [2], {}, None, StageLayout(0, 1.0, 2, 0, 8192, 8192)),
        ({"CPU": 2}, [2], {"num_actors": 2}, 1000, StageLayout(0, 0.5, 1, 0, 500, 500)),
        ({"CPU": 4}, [4], {"tokenizer_actors": 1}, None, StageLayout(0, 2.0, 3, 1, 8192, 1024)),
    ],
)
def test_stage_layout_gives_tokenizer_actors_the_cpus_gpus_leave(
    free, node_cpus, teacher, num_rows, layout
):
    cfg = TeacherConfig(model="m", **teacher)
    assert stage_layout(cfg, free, node_cpus, num_rows) == layout


@pytest.mark.parametrize(
    ("free", "node_cpus", "actors", "most"),
    [({"CPU": 16, "GPU": 1}, [16], 15, 14), ({"CPU": 2}, [2], 1, 0), ({"CPU": 8}, [4, 4], 6, 5)],
)
def test_tokenizer_actors_that_cannot_get_cpus_are_refused(free, node_cpus, actors, most):
    cfg = TeacherConfig(model="m", tokenizer_actors=actors)
    with pytest.raises(
        ConfigError, match=rf"teacher.tokenizer_actors: {actors} .* at most {most}$"
    ):
        stage_layout(cfg, free, node_cpus)
