"""The driver interrupted in each stage (Ctrl-C) or killed (SIGKILL), then the same command run
again: every rerun resumes where the run stopped, and the finished run trains each step once."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from leaf_ray.run import DRIVER
from tests.conftest import REPO, tiny_run_config
from tests.integration.test_pipeline import small_eval_set

pytestmark = pytest.mark.cluster  # drivers of their own, interrupted and killed


def start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "leaf_ray.cli", "distill", "--config", str(config)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def stop_when(proc: subprocess.Popen, ready: Callable[[], bool], sig: int) -> tuple[int, str]:
    """Send `sig` to the driver once `ready()`; its exit code and stderr."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_an_interrupted_or_killed_driver_resumes_in_every_stage(tmp_path, tiny_teacher, demo_texts):
    config = tiny_run_config(
        tmp_path,
        demo_texts[:400],
        tiny_teacher,
        "faults",
        run={"name": None},  # named <config>-<timestamp> by its first attempt, as by default
        ray={"num_cpus": 2},  # a Ray of its own, as `leaf-ray distill` starts on a laptop
        train={
            "epochs": 2,
            "cycles": 1,
            "batch_size": 16,
            "log_every": 1,
            "checkpoint_every": 10,
        },
        eval={"datasets": [str(small_eval_set(tmp_path / "eval"))], "max_seq_length": 64},
    )
    out = tmp_path / "out"

    # Ctrl-C in the teacher stage: one line, exit 130, Ray shut down.
    code, err = stop_when(start(config), lambda: any(out.glob("teacher_cache/*/key.json")), 2)
    assert code == 130, err[-3000:]
    assert err.strip().endswith("leaf-ray: interrupted; rerun the same command to resume")
    (partial,) = out.glob(".faults-*.partial")  # every attempt after this one resumes it

    # SIGKILL mid-training, once the first checkpoint is written.
    checkpoints = partial / "ray_train"
    code, _ = stop_when(start(config), lambda: any(checkpoints.glob("checkpoint_*")), 9)
    assert code == -signal.SIGKILL

    # Ctrl-C in the evaluation: the trained student is there, the run not yet published.
    code, err = stop_when(start(config), lambda: (partial / "student").is_dir(), 2)
    assert code == 130, err[-3000:]
    trained = (partial / "metrics.jsonl").read_text()

    done = start(config)
    said, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    run = out / partial.name.removeprefix(".").removesuffix(".partial")
    assert f"leaf-ray: resuming the unfinished run {run}\n" in said
    assert list(out.glob(".faults-*.partial")) == [] and not (run / DRIVER).exists()
    assert (run / "metrics.jsonl").read_text() == trained  # the evaluation alone ran again
    history = [json.loads(line) for line in trained.splitlines()]
    steps = [row["step"] for row in history]
    assert steps == list(range(1, steps[-1] + 1))  # each step once: none repeated or skipped
    assert history[-1]["resumes"] >= 1  # the killed run's checkpoint was resumed
    assert (run / "eval.json").is_file() and not partial.exists()
