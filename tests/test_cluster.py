"""The whole distillation on two Ray nodes made by `ray.cluster_utils.Cluster` on this machine
(in a subprocess: this process already runs the tests' local Ray)."""

from leaf_ray.pipeline import evaluate_run
from tests.conftest import run_on_own_cluster, tiny_run_config
from tests.test_pipeline import small_eval_set


def test_distillation_spreads_over_two_nodes(tmp_path, tiny_teacher, demo_texts, ray_local):
    cfg = tiny_run_config(
        tmp_path,
        demo_texts[:400],
        tiny_teacher,
        "two-nodes",
        teacher={"num_actors": 2},
        train={"placement_strategy": "SPREAD", "epochs": 1, "cycles": 1},
        eval={
            "datasets": [str(small_eval_set(tmp_path / "eval"))],
            "max_seq_length": 64,
            "dimensions": [16],
            "quantizations": ["float32", "int8", "binary"],
        },
    )
    two = run_on_own_cluster("two_nodes", cfg, timeout=600)

    # Ray's own records: teacher actors, DDP workers and scoring tasks ran on both nodes.
    nodes = set(two["nodes"])
    assert len(nodes) == 2
    assert len(two["teacher_actors"]) == 2 and set(two["teacher_actors"]) == nodes
    assert len(two["train_workers"]) == 2 and set(two["train_workers"]) == nodes
    # One scoring task per (task, mode, size, precision): 4 modes x 2 sizes x 3 precisions, and
    # some ran at the same time on different nodes.
    spans = two["scoring"]
    assert len(two["rows"]) == len(spans) == 4 * 2 * 3
    assert {s["node"] for s in spans} == nodes
    assert any(
        a["node"] != b["node"] and a["start"] < b["end"] and b["start"] < a["end"]
        for a in spans
        for b in spans
    ), spans

    # The same run evaluated on one node (the tests' local Ray, its own eval cache, so every
    # model is embedded again) scores the same.
    one = evaluate_run(two["run"], [f"eval.cache_dir={tmp_path / 'one-node-cache'}"])
    assert one.embedded["teacher"] > 0
    key = ("dataset", "mode", "dimension", "quantization")
    one_scores = {tuple(r[k] for k in key): r["score"] for r in one.rows}
    two_scores = {tuple(r[k] for k in key): r["score"] for r in two["rows"]}
    assert one_scores.keys() == two_scores.keys()
    assert all(abs(one_scores[k] - two_scores[k]) < 1e-3 for k in one_scores), (
        one_scores,
        two_scores,
    )
