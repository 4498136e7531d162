"""Run `leaf-ray eval` on a two-node Ray cluster made on this machine, then print, as JSON, the
rows it scored and where and when Ray says each scoring task ran.

    python -m tests.two_nodes RUN_DIR [key.path=value ...]

Each node gets 1 CPU (this machine has 2) and ports of its own: other Ray on the machine (the
tests' local one) holds the defaults."""

import json
import socket
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks

from leaf_ray.pipeline import evaluate_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args() -> dict:
    return {
        "num_cpus": 1,
        "object_store_memory": 200 * 2**20,
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port(),
    }


def main() -> None:
    head = node_args() | {"include_dashboard": True, "dashboard_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(**node_args())
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    outcome = evaluate_run(Path(sys.argv[1]), sys.argv[2:])
    scored = []
    for _ in range(30):  # task events reach the state API about a second after they happen
        tasks = list_tasks(detail=True, limit=10_000, raise_on_missing_output=False)
        scored = [t for t in tasks if t.name.endswith("_score_task") and t.end_time_ms]
        if len(scored) == len(outcome.rows):
            break
        time.sleep(1)
    spans = [{"node": t.node_id, "start": t.start_time_ms, "end": t.end_time_ms} for t in scored]
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("TWO_NODES " + json.dumps({"rows": outcome.rows, "tasks": spans, "nodes": nodes}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
