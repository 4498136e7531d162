"""Quality of the mpnet recipe (configs/mpnet.yaml) under each projection init and training recipe.

Each recipe is one `leaf-ray distill` of configs/mpnet.yaml with a few overrides, on the same
texts, precomputed teacher vectors and eval sets, every trained recipe with the same epochs and
batch. A run's `student_init` and `asymmetric_init` rows are its fitted head with no training:
they are reported as `<fit>_head` rows (and `head_only` for the default's fit).

    python bench/quality.py --texts T.jsonl.gz --vectors V.parquet --eval D1 D2 \\
        [--recipes default random_head ...] [--limit 20000] [--seed 0]
    python bench/quality.py --table    # the committed results as a markdown table

Rows are merged into bench/results/quality-mpnet.json (keys: recipe, seed, texts, epochs, task,
mode, ndcg_at_10); each run's log is kept beside its run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "mpnet.yaml"
RESULTS = REPO / "bench" / "results" / "quality-mpnet.json"

# recipe -> overrides of configs/mpnet.yaml ("default" is the file as it is)
RECIPES = {
    "default": [],  # kl at temperature 0.03 over batches of teacher neighbours
    "tau_0.02": ["train.kl_temperature=0.02"],  # sharper targets: the text's own vector first
    "tau_0.05": ["train.kl_temperature=0.05"],  # softer targets: more weight on the neighbours
    "tau_0.2": ["train.kl_temperature=0.2"],  # softer still
    "length": ["train.kl_temperature=0.05", "train.batching=length"],  # batches of similar length
    "random_head": [  # LEAF as the paper trains: l2 from a random projection at a fast rate
        "student.projection_init=random",
        "train.loss=l2",
        "train.freeze_projection=false",
        "train.lr=2.0e-4",
        "train.head_lr=1.0e-2",
    ],
    "l2_frozen": ["train.loss=l2"],  # l2 through the frozen fitted projection
    "least_squares_train": [
        "student.projection_init=least_squares",
        "train.loss=l2",
        "train.freeze_projection=false",
    ],
    "procrustes_train": ["train.loss=l2", "train.freeze_projection=false"],  # the head trains too
    "head_first": [
        "train.loss=l2",
        "train.freeze_projection=false",
        "train.head_only_ratio=0.1",
        "train.head_lr=2.0e-4",
    ],
    "lr_1e-5": ["train.loss=l2", "train.lr=1.0e-5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", help="training texts (JSONL: id, text, kind)")
    parser.add_argument("--vectors", help="the teacher's vectors of those texts")
    parser.add_argument("--eval", nargs="+", help="BEIR-layout folders")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--limit", type=int, default=20000, help="first N training texts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=str(REPO / "runs" / "quality"))
    parser.add_argument("--table", action="store_true", help="print the results as markdown")
    parser.add_argument(
        "--budget-plot", help="plot a recipe's scores by texts to this PNG (--recipes: which one)"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    if args.budget_plot:
        recipe = args.recipes[0] if len(args.recipes) == 1 else "default"
        budget_plot(json.loads(RESULTS.read_text()), Path(args.budget_plot), recipe)
        return
    for recipe in args.recipes:
        rows = run_recipe(recipe, args)
        merge(rows)
        print(json.dumps([r for r in rows if r["mode"] in ("student", "asymmetric")]), flush=True)


def run_recipe(recipe: str, args: argparse.Namespace) -> list[dict]:
    name = f"{recipe}-n{args.limit}-s{args.seed}"
    storage = Path(args.storage)
    run = storage / name
    overrides = [
        f"run.name={name}",
        f"run.storage={storage}",
        f"run.seed={args.seed}",
        f"data.sources.0.path={args.texts}",
        f"data.sources.0.limit={args.limit}",
        f"teacher.vectors={args.vectors}",
        f"eval.datasets={json.dumps(args.eval)}",
        "eval.dimensions=[]",
        "eval.quantizations=[float32]",
        *RECIPES[recipe],
    ]
    if not (run / "eval.json").is_file():
        storage.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "leaf_ray.cli", "distill", "--config", str(CONFIG)]
        with open(storage / f"{name}.log", "w") as log:
            print(" ".join([*cmd, *overrides]), file=log, flush=True)
            env = os.environ | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
            subprocess.run([*cmd, *overrides], stdout=log, stderr=log, env=env, check=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    common = {"seed": args.seed, "texts": args.limit, "epochs": cfg["train"]["epochs"]}
    fit = cfg["student"]["projection_init"]
    rows = []
    for r in json.loads((run / "eval.json").read_text()):
        if not r["full"] or r["quantization"] != "float32":
            continue
        row = {"task": r["dataset"], "mode": r["mode"], "ndcg_at_10": r["score"]}
        rows.append({"recipe": recipe, **common, **row})
        untrained = {"student_init": "student", "asymmetric_init": "asymmetric"}.get(r["mode"])
        shared = r["mode"] in ("teacher", "pretrained")
        if fit != "random" and (untrained or shared):
            head = {**row, "mode": untrained or r["mode"]}
            names = [f"{fit}_head"] + (["head_only"] if recipe == "default" else [])
            rows += [{"recipe": n, **common, "epochs": 0, **head} for n in names]
    return rows


def markdown(rows: list[dict]) -> str:
    """A row per (recipe, texts, seed), a column per (task, mode): nDCG@10."""
    columns = sorted(
        {(r["task"], r["mode"]) for r in rows}, key=lambda c: (c[0], MODES.index(c[1]))
    )
    runs: dict[tuple, dict] = {}
    for r in rows:
        runs.setdefault((r["recipe"], r["texts"], r["epochs"], r["seed"]), {})[
            r["task"], r["mode"]
        ] = r["ndcg_at_10"]
    head = ["recipe", "texts", "epochs", "seed", *(f"{t} {m}" for t, m in columns)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for (recipe, texts, epochs, seed), scores in sorted(runs.items()):
        cells = [f"{scores[c]:.4f}" if c in scores else "" for c in columns]
        lines.append(f"| {recipe} | {texts} | {epochs} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_plot(rows: list[dict], out: Path, recipe: str) -> None:
    """nDCG@10 of `recipe` by training texts (each seed a point, their mean a line),
    a panel per task, against the pretrained model alone and the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = [r for r in rows if r["task"] == task and r["recipe"] == recipe]
        for mode, style in (("student", "o-"), ("asymmetric", "s-")):
            points = sorted((r["texts"], r["ndcg_at_10"]) for r in mine if r["mode"] == mode)
            sizes = sorted({n for n, _ in points})
            means = [
                sum(v for n, v in points if n == size) / sum(n == size for n, _ in points)
                for size in sizes
            ]
            ax.plot(sizes, means, style, label=mode)
            ax.scatter(*zip(*points, strict=True), s=12, color="grey", zorder=3)
        fitted = sorted(
            (r["texts"], r["ndcg_at_10"])
            for r in rows
            if r["task"] == task and r["recipe"] == "head_only" and r["mode"] == "asymmetric"
        )
        ax.plot(*zip(*fitted, strict=True), "s:", color="C1", label="fitted projection, asymmetric")
        for mode, style in (("pretrained", ":"), ("teacher", "--")):
            level = [r["ndcg_at_10"] for r in mine if r["mode"] == mode]
            if level:
                ax.axhline(level[0], linestyle=style, color="black", label=f"{mode} alone")
        ax.set(title=task, xlabel="training texts (1 epoch)", ylabel="nDCG@10", xscale="log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)


MODES = ["teacher", "pretrained", "student_init", "student", "asymmetric_init", "asymmetric"]


def merge(rows: list[dict]) -> None:
    """Rows replace earlier ones with the same recipe, seed, texts, task and mode."""

    def key(r: dict) -> tuple:
        return r["recipe"], r["seed"], r["texts"], r["task"], r["mode"]

    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    new = {key(r): r for r in rows}
    kept = [r for r in old if key(r) not in new] + list(new.values())
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(kept, key=key), indent=1) + "\n")
    tmp.replace(RESULTS)


if __name__ == "__main__":
    main()
