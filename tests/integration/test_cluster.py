"""The whole distillation on two Ray nodes made by `ray.cluster_utils.Cluster` on this machine
(in a subprocess: this process already runs the tests' local Ray)."""

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leaf_ray.recipe import evaluate_run
from tests.conftest import REPO, run_on_own_cluster, tiny_run_config
from tests.integration.test_pipeline import small_eval_set

pytestmark = pytest.mark.cluster  # Ray clusters of their own


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
    # One scoring task per (task, mode, size, precision): 5 modes x 2 sizes x 3 precisions, and
    # some ran at the same time on different nodes.
    spans = two["scoring"]
    assert len(two["rows"]) == len(spans) == 5 * 2 * 3
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


LISTEN = "0A"  # TCP state in /proc/net/tcp


def listening_addresses(pids: set[int]) -> set[str]:
    """host:port of every TCP socket in LISTEN state that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.add(decode_address(fields[1]))
    return found


def decode_address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:  # /proc/net/tcp6: four little-endian 32-bit words
        ip = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return f"{ip}:{int(port, 16)}"


def descendants(pid: int) -> set[int]:
    children = {pid}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            children |= descendants(int(child))
    return children


def test_a_ray_of_our_own_is_closed_to_unauthenticated_clients(tmp_path):
    """The local Ray that leaf-ray starts (as `make demo` does): some of Ray's servers listen on
    every interface, so it runs with Ray's token authentication (on unless RAY_AUTH_MODE
    disables it), and a client without the token is refused while one with it joins."""
    script = (
        "import os, sys, time, ray\n"
        "from leaf_ray.config import RayConfig\n"
        "from leaf_ray.cluster import connect_ray\n"
        "connect_ray(RayConfig(num_cpus=1))\n"
        "ray.get(ray.remote(lambda: 1).remote())\n"  # a worker process too
        "print('READY', ray.get_runtime_context().gcs_address, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env |= {"RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        cwd=REPO,
    )
    try:
        ready, gcs = proc.stdout.readline().split()
        assert ready == "READY"
        listening = listening_addresses(descendants(proc.pid))
        join = (
            f"import ray; ray.init(address='{gcs}'); print(ray.get(ray.remote(lambda: 7).remote()))"
        )
        clients = {
            mode: subprocess.run(
                [sys.executable, "-c", join],
                env=env | {"RAY_AUTH_MODE": mode},
                capture_output=True,
                text=True,
                timeout=120,
            )
            for mode in ("disabled", "token")
        }
    finally:
        proc.communicate("\n", timeout=60)
    assert len(listening) >= 3, listening  # GCS, raylet, object manager at least
    assert clients["disabled"].returncode != 0 and "7" not in clients["disabled"].stdout
    assert clients["token"].returncode == 0 and clients["token"].stdout.split()[-1] == "7"
