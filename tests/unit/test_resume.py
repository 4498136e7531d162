"""A rerun without a run.name finds the run an earlier attempt of the same config left
unfinished. No Ray: the work folders are laid out as `distill` leaves them."""

import os
import subprocess
import sys

from leaf_ray.cli import DEFAULT_CONFIG
from leaf_ray.config import load_config
from leaf_ray.recipe import kept_config
from leaf_ray.run import DRIVER, claim, unfinished_run, work_folder
from leaf_ray.storage import Location


def left_unfinished(storage: Location, name: str, overrides: list[str], pid: int) -> None:
    """A work folder as a driver killed after `_start` leaves it: config.yaml and its claim."""
    cfg = load_config(DEFAULT_CONFIG, [f"run.storage={storage}", f"run.name={name}", *overrides])
    work = work_folder(storage / name)
    work.mkdir(parents=True)
    (work / "config.yaml").write_text(kept_config(cfg))
    claim(work)
    host = (work / DRIVER).read_text().split()[0]
    (work / DRIVER).write_text(f"{host} {pid}")


def test_the_newest_unfinished_run_of_the_same_config_is_resumed(tmp_path):
    storage = Location.of(tmp_path / "runs")
    cfg = load_config(DEFAULT_CONFIG, [f"run.storage={storage}"])
    stem, wanted = cfg.run_stem(), kept_config(cfg)
    assert unfinished_run(storage, stem, wanted) is None  # nothing there yet
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead_pid = int(dead.stdout)
    left_unfinished(storage, "demo-20261201-090000", [], dead_pid)
    left_unfinished(storage, "demo-20261201-100000", [], dead_pid)
    assert unfinished_run(storage, stem, wanted) == "demo-20261201-100000"
    # Newer, but of another config (what it trained would not be this run's), or still being
    # built by a live driver (this test's own process): neither is taken.
    left_unfinished(storage, "demo-20261201-110000", ["train.epochs=2"], dead_pid)
    left_unfinished(storage, "demo-20261201-120000", [], os.getpid())
    assert unfinished_run(storage, stem, wanted) == "demo-20261201-100000"
    # Where Ray runs and how the student is scored may change between attempts.
    moved = load_config(DEFAULT_CONFIG, [f"run.storage={storage}", "eval.top_k=10"])
    assert unfinished_run(storage, stem, kept_config(moved)) == "demo-20261201-100000"
    assert unfinished_run(storage, "other", wanted) is None
