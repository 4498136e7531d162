"""A run's evaluation written out: eval.json, eval.md and mteb's results folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from leaf_ray.report.plots import plot_compression, plot_quantization
from leaf_ray.run import COMPRESSION_PNG, EVAL_JSON, EVAL_MD, MTEB_DIR, QUANTIZATION_PNG
from leaf_ray.storage import Location

if TYPE_CHECKING:
    from leaf_ray.eval.runner import EvalOutcome


def write_eval(outcome: EvalOutcome, out: Path) -> None:
    """mteb's JSON per (model, setting, task) under mteb/, eval.json (every row), eval.md (the
    headline table, then every size and precision, with the plots), and the plots."""
    rows = outcome.rows
    _write_mteb_results(outcome, out / MTEB_DIR)
    Location.of(out / EVAL_JSON).write(json.dumps(rows, indent=2) + "\n")
    metric = rows[0]["metric"] if rows else "score"
    lines = ["# leaf-ray evaluation", "", f"{metric} per task and mode (full size, float32):", ""]
    lines += [f"| task | mode | {metric} | vs teacher | vs start |", "|---|---|---:|---:|---:|"]
    for r in main_rows(rows):
        lines.append(
            f"| {r['dataset']} | {r['mode']} | {r['score']:.4f} | {_retention(r)} | {_change(r)} |"
        )
    lines += ["", START_NOTE]
    embedded = ", ".join(f"{role} {n}" for role, n in outcome.embedded.items())
    lines += ["", f"Texts embedded now (0: all from the eval cache): {embedded}."]
    if len(rows) > len(main_rows(rows)):  # sizes or precisions beyond the headline were asked
        plot_compression(rows, out)
        plot_quantization(rows, out)
        lines += ["", f"![score against size]({COMPRESSION_PNG})"]
        lines += ["", f"![score against precision]({QUANTIZATION_PNG})", ""]
        lines.append("Every size and precision (vs the teacher at the same size and precision):")
        lines += ["", f"| task | mode | dims | precision | {metric} | vs teacher |"]
        lines.append("|---|---|---:|---|---:|---:|")
        for r in rows:
            lines.append(
                f"| {r['dataset']} | {r['mode']} | {r['dimension']} | {r['quantization']} | "
                f"{r['score']:.4f} | {_retention(r)} |"
            )
    lines += ["", f"mteb's results, one folder per model and setting: `{MTEB_DIR}/results/`."]
    Location.of(out / EVAL_MD).write("\n".join(lines) + "\n")


def _write_mteb_results(outcome: EvalOutcome, folder: Path) -> None:
    """mteb's own layout (ResultCache), built aside and swapped in whole."""
    from mteb.cache import ResultCache

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cache = ResultCache(tmp)
    for meta, result in outcome.results:
        cache.save_to_cache(result, meta)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def main_rows(rows: list[dict]) -> list[dict]:
    """Full-size float32 vectors: the headline comparison."""
    return [r for r in rows if r["full"] and r["quantization"] == "float32"]


def _retention(row: dict) -> str:
    return f"{row['retention']:.1%}" if row["retention"] is not None else "-"


START_NOTE = (
    "vs start: student against student_init (the student as training started, its projection "
    "fitted), asymmetric against asymmetric_init, student_init against pretrained (the student "
    "model alone, as it was before leaf-ray)."
)


def _change(row: dict) -> str:
    return f"{row['change']:+.4f}" if row.get("change") is not None else "-"
