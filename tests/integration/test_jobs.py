"""`ray job submit` against a running cluster: `ray start --head` here, the distillation submitted
as a Ray job with the repo as its working directory, its outputs found on shared storage."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from sentence_transformers import SentenceTransformer

from tests.conftest import REPO, free_port
from tests.integration.test_pipeline import main_scores, small_eval_set

pytestmark = pytest.mark.cluster  # a `ray start --head` cluster of its own

RAY = str(Path(sys.executable).parent / "ray")


def jobs_api_answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def ray_head():
    """A one-node cluster started the way users start one, in the foreground (`--block`) in its
    own process group and temp folder: stopping it stops only it, not other Ray on the machine
    (`ray stop` would), and a plain `ray.init()` elsewhere does not join it."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",  # explicit on both sides (token auth is on by default)
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are
    dashboard = free_port()
    start = [RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={free_port()}"]
    start += ["--include-dashboard=true", f"--dashboard-port={dashboard}", "--disable-usage-stats"]
    # Ports of its own: another Ray on this machine (the tests' local one) holds the defaults.
    start += [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    start += [
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    head = subprocess.Popen(
        [*start, f"--temp-dir={temp_dir}"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        # Asked over HTTP: a `ray job list` process a second would take a core from the head.
        while not jobs_api_answers(address):
            assert head.poll() is None and time.monotonic() < deadline, "ray start failed"
            time.sleep(1)
        yield env, address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops what it started
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its workers' graceful exit is not under test
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_distillation(ray_head, tmp_path, tiny_teacher, demo_texts):
    env, address = ray_head
    storage = tmp_path / "shared"  # what every node would mount
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in demo_texts[:400]))
    config = {
        "run": {"name": "submitted", "storage": str(storage / "runs")},
        "data": {"sources": [{"path": "texts.jsonl"}]},
        "teacher": {"model": str(tiny_teacher), "max_seq_length": 64},
        "student": {"max_seq_length": 64},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 1, "cycles": 1},
        "eval": {"datasets": [str(small_eval_set(tmp_path / "eval"))], "max_seq_length": 64},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))

    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--"]
    entrypoint = [sys.executable, "jobs/distill.py", "--config", str(tmp_path / "job.yaml")]
    job = subprocess.run(submit + entrypoint, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    # Off a terminal, progress is log lines, each once (Ray Train's workers tee `print`).
    finished = re.findall(r"train student.* (\d+)/\1$", job.stdout + job.stderr, re.MULTILINE)
    assert len(finished) == 1, job.stdout[-3000:]

    run_dir = storage / "runs" / "submitted"
    student = SentenceTransformer(str(run_dir / "student"), device="cpu")
    assert student.encode(["a query"]).shape == (1, 32)
    assert {r["mode"] for r in json.loads((run_dir / "eval.json").read_text())} >= {"asymmetric"}
    assert (storage / "runs" / "teacher_cache").is_dir()  # the cache sits on the same storage

    # The evaluation job, submitted the same way, scores a checkpoint as the student (full-size
    # float32 here) and writes its report beside the run; the teacher is scored as before.
    checkpoint = sorted(c for c in (run_dir / "ray_train").glob("checkpoint_*") if c.is_dir())[-1]
    entrypoint = [sys.executable, "jobs/evaluate.py", "--run", str(run_dir)]
    entrypoint += ["--student", str(checkpoint), "eval.quantizations=[float32]"]
    job = subprocess.run(submit + entrypoint, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    report = run_dir / "evals" / checkpoint.name
    assert (report / "eval.md").is_file()
    assert f"report: {report / 'eval.md'}\n" in job.stdout  # one line in the job's log
    scores = main_scores(json.loads((report / "eval.json").read_text()))
    before = main_scores(json.loads((run_dir / "eval.json").read_text()))
    assert set(scores) == set(before) and scores["teacher"] == before["teacher"]
    shutil.rmtree(storage)
