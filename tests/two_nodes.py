"""Run `leaf-ray distill` on a two-node Ray cluster made on this machine, then print, as JSON,
the run folder, its eval rows, and where (and when) Ray's state API says each teacher actor,
training worker and scoring task ran.

    python -m tests.two_nodes CONFIG [key.path=value ...]

Each node gets 2 logical CPUs (the machine's 2 cores, counted twice: Ray Data's tasks take a
whole CPU, and a node needs one free next to its teacher actor) and ports of its own: other Ray
on the machine (the tests' local one) holds the defaults."""

import json
import socket
import sys
import tempfile
import time

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from leaf_ray.config import load_config
from leaf_ray.recipe import distill


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args() -> dict:
    return {
        "num_cpus": 2,
        "object_store_memory": 300 * 2**20,
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port(),
    }


def scoring_spans(expected: int) -> list[dict]:
    """Task events reach the state API about a second after they happen: poll for them."""
    for _ in range(30):
        tasks = list_tasks(detail=True, limit=10_000, raise_on_missing_output=False)
        done = [t for t in tasks if t.name.endswith("_score_task") and t.end_time_ms]
        if len(done) >= expected:
            break
        time.sleep(1)
    return [{"node": t.node_id, "start": t.start_time_ms, "end": t.end_time_ms} for t in done]


def main() -> None:
    # Its own temp dir: Ray records "the cluster on this machine" there, and a stale record
    # in /tmp/ray would make later plain ray.init() calls try to join this one.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths are limited
    head = node_args() | {
        "include_dashboard": True,
        "dashboard_port": free_port(),
        "temp_dir": temp_dir,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(**node_args())
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    run = distill(load_config(sys.argv[1], sys.argv[2:]))
    rows = json.loads((run / "eval.json").read_text())
    actors = list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
    report = {
        "run": run.path,
        "rows": rows,
        "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
        "teacher_actors": [a.node_id for a in actors if "MapWorker" in a.class_name],
        "train_workers": [a.node_id for a in actors if a.class_name == "RayTrainWorker"],
        "scoring": scoring_spans(len(rows)),
    }
    print("TWO_NODES " + json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
