"""What leaf-ray prints: the dry run, the capacity plan, a run's summary, the cache's check."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from leaf_ray.capacity import (
    CACHE_ROW_OVERHEAD_BYTES,
    FIGURES,
    VECTOR_BYTES,
    Plan,
    ddp_efficiency,
    notes,
    overrides,
)
from leaf_ray.config import LeafConfig
from leaf_ray.report.eval_report import _change, _retention, main_rows
from leaf_ray.run import EVAL_JSON, EVAL_MD, METRICS_JSONL, TEACHER_CACHE_JSON, read_metrics
from leaf_ray.storage import Location

if TYPE_CHECKING:
    from leaf_ray.teacher.cache import VerifyReport


def print_dry_run(cfg: LeafConfig, rows: int, skipped: Counter) -> None:
    """What `distill` would do, once its inputs are checked (`rows`: the texts it would read;
    `skipped`: bad rows it would drop, by reason): no model is loaded or downloaded."""
    t, s, tr = cfg.teacher, cfg.student, cfg.train
    student = (
        f"{s.num_layers or 'half the'} teacher layers" if s.init == "layer_reduction" else s.model
    )
    local = f"a local Ray ({cfg.ray.num_cpus or 'all'} CPUs)"
    console = Console(soft_wrap=True, emoji=False)  # ":train:" is a split, not an emoji
    console.print(f"[bold]config[/] {cfg.source_file}")
    console.print(f"[bold]run[/] {cfg.storage() / cfg.run_name()}")
    console.print(f"[bold]ray[/] {cfg.ray.address or f'RAY_ADDRESS if set, else {local}'}")
    source = {
        "vectors": f"precomputed vectors {t.vectors}",
        "http": f"endpoint {t.http and t.http.url}",
    }
    console.print(
        f"[bold]1. teacher[/] {t.model} ({source.get(t.backend, 'sentence-transformers')}) on "
        f"{t.num_actors} Ray Data actor(s), batch {t.batch_size}; "
        + (
            f"vectors cached ({t.vector_dtype}) in {cfg.cache_dir()}"
            if tr.data_mode == "cached"
            else "streamed into training every epoch, not cached"
        )
    )
    for src in cfg.data.sources:
        where = src.path or ":".join(
            filter(None, (f"hf:{src.hf_dataset}", src.hf_config, src.split, src.text_field))
        )
        notes = [f"first {src.limit}" if src.limit else "", src.kind or "", f"weight {src.weight}"]
        console.print(f"   texts from {where} ({', '.join(filter(None, notes))})")
    if any(src.path for src in cfg.data.sources):
        console.print(f"   {rows} texts in the files, repeated ones counted each time")
    projection = s.projection_init
    if s.projection_init != "random":
        projection += f" (fitted on {s.projection_fit_texts} texts)"
    if tr.head_only_ratio:
        projection += f", trained alone for the first {tr.head_only_ratio:.0%} of steps"
    console.print(
        f"[bold]2. student[/] {s.init}: {student}, max length {s.max_seq_length}, projection "
        f"{projection}; {tr.num_workers} DDP worker(s), {tr.epochs} epoch(s) in {tr.cycles} "
        f"cycle(s) of batch {tr.batch_size} ({tr.grad_accumulation} micro-batch(es) per step), "
        f"{tr.loss} loss, lr {tr.lr} -> {tr.lr * tr.final_lr_ratio:g} per cycle (projection "
        f"{tr.projection_lr})"
    )
    ev = cfg.eval
    tasks = [*ev.datasets, *(f"mteb:{name}" for name in ev.mteb_tasks)]
    sizes = ", ".join(map(str, ["full", *ev.dimensions]))
    console.print(
        f"[bold]3. eval[/] {', '.join(tasks) or 'none'}; sizes {sizes}; "
        f"{', '.join(ev.quantizations)}; vectors cached in {cfg.eval_cache_dir()}"
    )
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    console.print(
        f"[bold]inputs[/] checked; {f'bad rows skipped: {dropped}' if dropped else 'no bad rows'}"
    )


def print_capacity(plan: Plan, vector_dtype: str, single: Plan | None, other: Plan) -> None:
    """`leaf-ray plan`: the split, per-stage rates, wall time, GPU-hours and cache size; then the
    same run on one GPU and in the other data mode, and the figures all of it rests on."""
    c, t, corpus = plan.cluster, plan.teacher, plan.corpus
    console = Console(soft_wrap=True, emoji=False, width=120)  # tables unwrapped in logs too
    console.print(f"[bold]cluster[/] {c.label}: {c.gpus} GPU(s), {c.gpu.name} {c.gpu.basis}")
    console.print(
        f"[bold]teacher[/] {plan.teacher_name}: {t.dim}-d ({plan.dim_basis}), speed "
        f"x{t.speed:.2f} of bert-base ({t.basis})"
    )
    console.print(
        f"[bold]corpus[/] {corpus.texts:,} texts ({corpus.basis}); {corpus.rows_per_epoch:,} "
        f"training rows per epoch (x weights) x {plan.epochs} epoch(s)"
    )
    table = Table(title=f"{plan.mode} plan on {c.label}")
    for column in ("stage", "GPUs", "per-GPU seq/s", "seq/s", "rows", "time"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    teach = "teacher (embeds once)" if plan.mode == "cached" else "teacher (every epoch)"
    eff = ddp_efficiency(plan.trainer_gpus)
    train = f"train (batch {plan.per_gpu_batch:g}/GPU, DDP x{eff:g})"
    for stage, gpus, rate, rows, hours in (
        (teach, plan.teacher_gpus, plan.teacher_rate, plan.teacher_rows, plan.teacher_hours),
        (train, plan.trainer_gpus, plan.train_rate, plan.train_rows, plan.train_hours),
    ):
        row = (f"{rate / gpus:,.0f}", f"{rate:,.0f}", f"{rows:,}", _duration(hours))
        table.add_row(stage, str(gpus), *row)
    console.print(table)
    how = "stages run one after the other" if plan.mode == "cached" else "stages overlap"
    if plan.shared_gpu:
        how = "both stages share the one GPU, taking turns"
    console.print(
        f"[bold]wall time[/] {_duration(plan.wall_hours)} ({how}; bottleneck: {plan.bottleneck}); "
        f"{plan.gpu_hours:,.1f} GPU-hours held"
    )
    console.print(f"[bold]run it with[/] {overrides(plan)}")
    size = (
        f"{corpus.texts:,} x ({t.dim} x {VECTOR_BYTES[vector_dtype]} B {vector_dtype} + "
        f"{CACHE_ROW_OVERHEAD_BYTES} B hash, kind, text) = {plan.cache_gib:,.1f} GiB"
    )
    if plan.mode == "cached":
        console.print(f"[bold]cache[/] {size}")
    else:
        console.print(f"[bold]cache[/] none (streaming); cached mode would write {size}")
    for note in notes(plan):
        console.print(f"[bold]note[/] {note}")
    if single:
        console.print(
            f"[bold]on 1 {c.gpu.name}[/] {_duration(single.wall_hours)}: this cluster is "
            f"{single.wall_hours / plan.wall_hours:.1f}x faster on {c.gpus}x the GPUs"
        )
    console.print(
        f"[bold]as train.data_mode={other.mode}[/] {_duration(other.wall_hours)} on this cluster "
        f"({other.teacher_gpus} teacher / {other.trainer_gpus} trainer GPU(s))"
    )
    figures = Table(
        title="Measured on one H100: bf16, ~100-token texts, bert-base teacher, MiniLM-L6 student"
    )
    derived = c.gpu.name != "H100"  # a column of this cluster's GPU, when it is another
    for column in ("figure", "H100 seq/s", *([f"{c.gpu.name} seq/s"] * derived), "source"):
        figures.add_column(column, justify="right" if "seq/s" in column else "left")
    for figure in FIGURES.values():
        rates = [f"{figure.seq_per_s:,.0f}"]
        rates += [f"{figure.seq_per_s * c.gpu.vs_h100:,.0f}"] * derived
        figures.add_row(figure.what, *rates, figure.source)
    console.print(figures)


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"


def print_summary(run_dir: Location, eval_dir: Location | None = None) -> None:
    """The eval table and loss, read back from the run folder's files (wherever they are)."""
    eval_dir = eval_dir or run_dir
    rows = json.loads((eval_dir / EVAL_JSON).read_text())
    metrics = run_dir / METRICS_JSONL
    history = read_metrics(metrics) if metrics.is_file() else []
    console = Console(soft_wrap=True)  # off a terminal (80 columns), a path would be folded
    table = Table(title=f"LEAF distillation: {eval_dir}")
    metric = rows[0]["metric"] if rows else "score"
    for column in ("task", "mode", metric, "vs teacher", "vs start"):
        table.add_column(column, justify="left" if column in ("task", "mode") else "right")
    for r in main_rows(rows):
        table.add_row(r["dataset"], r["mode"], f"{r['score']:.4f}", _retention(r), _change(r))
    console.print(table)
    console.print(f"report: {eval_dir / EVAL_MD}")
    note = run_dir / TEACHER_CACHE_JSON
    skipped = json.loads(note.read_text()).get("skipped_rows") if note.is_file() else None
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        console.print(f"skipped {sum(skipped.values())} bad rows (data.bad_rows=skip): {reasons}")
    if history:
        console.print(
            f"alignment loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} "
            f"over {history[-1]['step']} steps"
        )


def print_embedded(
    rows: int, unique: int, embedded: int, cache: Location, skipped: dict[str, int]
) -> None:
    """`leaf-ray embed`'s summary: texts, how many were embedded now, where the cache is."""
    Console(soft_wrap=True).print(
        f"[bold]teacher vectors[/] {rows} texts ({unique} distinct): {embedded} embedded "
        f"now, {unique - embedded} already cached\n[bold]cache[/] {cache}"
    )
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        Console(soft_wrap=True).print(f"[bold]skipped[/] bad rows: {reasons}")


def print_verify(report: VerifyReport, set_aside: list[str]) -> None:
    console = Console(soft_wrap=True)
    for shard in set_aside:
        console.print(f"  set aside: {shard} (its texts are embedded again by the next run)")
    status = "[green]ok[/]" if report.ok else "[red]FAILED[/]"
    console.print(
        f"[bold]cache verify[/] {status}: {report.rows} rows in {report.shards} shards; "
        f"{report.missing} missing, {len(report.corrupt)} corrupt, {report.duplicated} "
        "duplicated (harmless: read once)"
    )
    for problem in report.corrupt:
        console.print(f"  corrupt: {problem}")
    if report.orphans:
        console.print(f"  {len(report.orphans)} uncommitted shard(s) ignored (an interrupted run)")
