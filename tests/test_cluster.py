"""Multi-node behaviour on one machine: two Ray nodes made by `ray.cluster_utils.Cluster` in a
subprocess (this process already runs the tests' local Ray)."""

import json
import os
import shutil
import subprocess
import sys

import yaml
from sentence_transformers import SentenceTransformer

from leaf_ray.pipeline import evaluate_run
from tests.conftest import REPO
from tests.test_pipeline import small_eval_set


def finished_run(root, teacher) -> object:
    """A run folder as distill leaves it, minus the training: eval needs only the config, the
    student and the student before distillation (here: the teacher, and a re-seeded copy)."""
    run = root / "run"
    run.mkdir(parents=True)
    config = {
        "run": {"name": "run", "output_dir": str(root)},
        "data": {"sources": [{"path": str(root / "unused.jsonl")}]},
        "teacher": {"model": str(teacher), "max_seq_length": 64},
        "eval": {
            "datasets": [str(small_eval_set(root / "eval"))],
            "max_seq_length": 64,
            "dimensions": [16],
            "quantizations": ["float32", "int8", "binary"],
        },
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(teacher, run / "student")
    model = SentenceTransformer(str(teacher), device="cpu")
    for p in model.parameters():
        p.data.mul_(0.5).add_(0.01)  # not the teacher: another space, another score
    model.save_pretrained(str(run / "student_init"))
    return run


def test_eval_fans_out_over_two_nodes_concurrently(tmp_path, tiny_teacher, ray_local):
    run = finished_run(tmp_path, tiny_teacher)
    # One node (the tests' local Ray), then two, each embedding into its own eval cache.
    one_node = evaluate_run(run, [f"eval.cache_dir={tmp_path / 'cache-one'}"])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tests.two_nodes", str(run)]
    cmd.append(f"eval.cache_dir={tmp_path / 'cache-two'}")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(s for s in done.stdout.splitlines() if s.startswith("TWO_NODES "))
    two_nodes = json.loads(line.removeprefix("TWO_NODES "))

    # One scoring task per (task, mode, size, precision): 4 modes x 2 sizes x 3 precisions.
    assert len(one_node.rows) == len(two_nodes["rows"]) == 4 * 2 * 3
    spans = two_nodes["tasks"]
    assert len(spans) == len(one_node.rows)
    # Ray's own task records: scoring ran on both nodes, and some ran at the same time there.
    assert len(two_nodes["nodes"]) == 2
    assert {s["node"] for s in spans} == set(two_nodes["nodes"])
    overlapping = [
        (a, b)
        for a in spans
        for b in spans
        if a["node"] != b["node"] and a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlapping, spans
    # And the scores are a one-node run's.
    key = ("dataset", "mode", "dimension", "quantization")
    one = {tuple(r[k] for k in key): r["score"] for r in one_node.rows}
    two = {tuple(r[k] for k in key): r["score"] for r in two_nodes["rows"]}
    assert one.keys() == two.keys()
    assert all(abs(one[k] - two[k]) < 1e-3 for k in one), (one, two)
