"""The GPU run's headline figures in one file, bench/results/gpu-summary.json, from what
bench/gpu.sh measured: the teacher and training benchmarks' JSON, and the streaming distill's
exit status and log.

    python bench/gpu_summary.py --since MARKER --distill-exit 0 --distill-run RUN_DIR

A benchmark file older than MARKER (a file gpu.sh touched as it started) is an earlier run's,
and its figures are left out (null) rather than reported as this run's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leaf_ray.run import METRICS_JSONL, read_metrics

RESULTS = Path(__file__).resolve().parent / "results"


def fresh(path: Path, since: float) -> dict:
    """The JSON at `path` if this run wrote it, else {}."""
    if not path.is_file() or path.stat().st_mtime < since:
        return {}
    return json.loads(path.read_text())


def summary(teacher: dict, train: dict, distill_exit: int, run: Path | None) -> dict:
    b32 = next((r for r in train.get("results", []) if r["batch"] == 32), {})
    history = []
    if run is not None and (run / METRICS_JSONL).is_file():
        history = read_metrics(run / METRICS_JSONL)
    fused = b32.get("bare_fused_seq_per_s")
    return {
        "device": train.get("device") or teacher.get("device"),
        "teacher_stage_vs_bare": teacher.get("stage_marginal_vs_bare"),
        "train_b32_bare_eager_seq_per_s": b32.get("bare_seq_per_s"),
        "train_b32_fast_seq_per_s": b32.get("ray_fast_seq_per_s"),
        # Ray Train against the bare loop with the same step: fast against fused where measured
        "ray_train_vs_bare_b32": (b32["ray_fast_seq_per_s"] / fused if fused else b32.get("ratio")),
        "train_b32_eager_seq_per_s": b32.get("ray_seq_per_s"),
        "streaming_distill_finished": distill_exit == 0,
        "streaming_train_seq_per_s": history[-1]["seq_per_s"] if history else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--since", type=Path, required=True, help="a file made as the run began")
    parser.add_argument("--distill-exit", type=int, required=True)
    parser.add_argument("--distill-run", type=Path, help="the streaming distill's run folder")
    args = parser.parse_args()
    since = args.since.stat().st_mtime
    out = summary(
        fresh(RESULTS / "teacher-gpu.json", since),
        fresh(RESULTS / "train-gpu.json", since),
        args.distill_exit,
        args.distill_run,
    )
    tmp = RESULTS / "gpu-summary.json.tmp"
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(RESULTS / "gpu-summary.json")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
