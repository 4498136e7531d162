"""Run the teacher stage (`embed`) on a one-node Ray that declares a GPU next to 4 CPUs, then
print, as JSON, what it embedded, the cache shards it wrote, and which Ray Data actors ran,
with what each reserved.

    python -m tests.fake_gpu CONFIG

The GPU is logical: the actor holding it finds no CUDA and computes on CPU, so the GPU layout
(tokenizer actors feeding the teacher actor) runs on this machine."""

import json
import sys
import tempfile

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from leaf_ray.config import load_config
from leaf_ray.teacher.stage import embed
from tests.two_nodes import free_port, node_args


def main() -> None:
    head = node_args() | {
        "num_cpus": 4,
        "num_gpus": 1,
        "include_dashboard": True,  # for the state API
        "dashboard_port": free_port(),
        "temp_dir": tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    ray.init(address=cluster.address)
    vectors = embed(load_config(sys.argv[1]))
    actors = list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
    report = {
        "embedded": vectors.embedded,
        "shards": vectors.cache.shard_paths(vectors.cache.entries()),
        "actors": [
            {"class": a.class_name, "resources": a.required_resources}
            for a in actors
            if "MapWorker" in a.class_name
        ],
    }
    print("FAKE_GPU " + json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
