"""Plots: the loss curve, and retrieval against compression and quantization."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402

from leaf_ray.run import COMPRESSION_PNG, LOSS_PNG, QUANTIZATION_PNG  # noqa: E402

MODE_COLORS = {
    "teacher": "tab:blue",
    "pretrained": "tab:purple",
    "student_init": "tab:gray",
    "student": "tab:red",
    "asymmetric_init": "tab:olive",
    "asymmetric": "tab:green",
}


def plot_compression(rows: list[dict], out: Path) -> None:
    """Score against Matryoshka size, one panel per task, a line per (mode, precision)."""
    sets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    styles = {"float32": "-", "int8": "--", "binary": ":"}
    for ax, name in zip(axes[0], sets, strict=True):
        for mode, color in MODE_COLORS.items():
            for precision, style in styles.items():
                points = sorted(
                    (r["dimension"], r["score"])
                    for r in rows
                    if (r["dataset"], r["mode"], r["quantization"]) == (name, mode, precision)
                )
                if len(points) > 1:
                    dims, scores = zip(*points, strict=True)
                    label = f"{mode} {precision}"
                    ax.plot(dims, scores, style, color=color, marker="o", label=label)
        ax.set(title=name, xlabel="dimensions", ylabel=rows[0]["metric"], xscale="log")
        sizes = sorted({r["dimension"] for r in rows if r["dataset"] == name})
        ax.set_xticks(sizes, [str(d) for d in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out / COMPRESSION_PNG)


def plot_quantization(rows: list[dict], out: Path) -> None:
    """Score against precision at full size: grouped bars, one panel per task."""
    sets = sorted({r["dataset"] for r in rows})
    asked = {r["quantization"] for r in rows}
    precisions = [p for p in ("float32", "int8", "binary") if p in asked]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    width = 0.8 / len(MODE_COLORS)
    for ax, name in zip(axes[0], sets, strict=True):
        for i, (mode, color) in enumerate(MODE_COLORS.items()):
            score = {
                r["quantization"]: r["score"]
                for r in rows
                if (r["dataset"], r["mode"]) == (name, mode) and r["full"]
            }
            if score:
                xs = [j + i * width for j, p in enumerate(precisions) if p in score]
                ys = [score[p] for p in precisions if p in score]
                ax.bar(xs, ys, width, color=color, label=mode)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(precisions))], precisions)
        ax.set(title=f"{name} (full size)", ylabel=rows[0]["metric"])
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    _save(fig, out / QUANTIZATION_PNG)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot_loss(history: list[dict], validations: list[dict], run_dir: Path, title: str) -> None:
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    steps = [r["step"] for r in history]
    ax_loss.plot(steps, [r["loss"] for r in history], color="tab:blue", label="training")
    if validations:
        ax_loss.plot(
            [v["step"] for v in validations],
            [v["val_loss"] for v in validations],
            "o-",
            color="tab:green",
            label="held out (checkpoints)",
        )
        ax_loss.legend()
    ax_loss.set_ylabel("alignment loss")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in history], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimiser step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"leaf-ray: {title}")
    _save(fig, run_dir / LOSS_PNG)
