"""`leaf-ray plan`: the arithmetic checked against hand-computed figures, at internet scale."""

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.capacity import PlanError, corpus_size, notes, parse_cluster, plan_mode, plan_run
from leaf_ray.cli import DEFAULT_CONFIG, main
from leaf_ray.config import load_config

ARCTIC = "Snowflake/snowflake-arctic-embed-m-v1.5"
MXBAI = "mixedbread-ai/mxbai-embed-large-v1"
INTERNET = """\
data:
  sources:
    - {hf_dataset: org/web, text_field: text, kind: document, limit: 500000000}
teacher:
  model: TEACHER
train:
  epochs: 3
  cycles: 3
  batch_size: 4096
"""
H100_64 = "8x(8 GPU H100)"


def internet_config(tmp_path: Path, teacher: str = ARCTIC, *overrides: str):
    path = tmp_path / "internet.yaml"
    path.write_text(INTERNET.replace("TEACHER", teacher))
    return load_config(path, list(overrides))


def hand_train_rate(batch: float) -> float:
    """One H100 trainer at this per-GPU batch, by hand: a bare step's time is linear in batch
    through 32/1435 s and 256/6816 s; Ray Train runs at 796/1435 of bare."""
    per_sequence = (256 / 6816 - 32 / 1435) / (256 - 32)
    fixed = 32 / 1435 - 32 * per_sequence
    return 796 / 1435 * batch / (fixed + batch * per_sequence)


def test_the_train_rate_is_the_measured_one_at_batch_32():
    assert hand_train_rate(32) == pytest.approx(796)
    assert hand_train_rate(256) == pytest.approx(6816 * 796 / 1435)


def test_cached_at_internet_scale(tmp_path):
    plan = plan_run(internet_config(tmp_path), parse_cluster(H100_64))
    assert (plan.cluster.gpus, plan.teacher_gpus, plan.trainer_gpus) == (64, 64, 64)
    assert plan.per_gpu_batch == 64  # 4096 over 64 trainers
    # phase 1: 500M distinct texts on 64 actors at 5,216 seq/s each
    assert plan.teacher_hours * 3600 == pytest.approx(500e6 / (64 * 5216))
    assert plan.teacher_hours == pytest.approx(0.41605, abs=1e-5)  # 1,497.8 s
    # phase 2: 3 epochs of 500M rows on 64 DDP trainers at 90% scaling
    train_s = 3 * 500e6 / (64 * hand_train_rate(64) * 0.9)
    assert plan.train_hours * 3600 == pytest.approx(train_s)
    assert plan.wall_hours * 3600 == pytest.approx(500e6 / (64 * 5216) + train_s)
    assert plan.gpu_hours == pytest.approx(64 * plan.wall_hours)
    # 500M x (768 float32 + 440 bytes of hash, kind and text)
    assert plan.cache_gib == pytest.approx(500e6 * (768 * 4 + 440) / 2**30)
    assert plan.cache_gib == pytest.approx(1635.4, abs=0.1)


def test_float16_vectors_halve_the_vector_part_of_the_cache(tmp_path):
    cfg = internet_config(tmp_path, ARCTIC, "teacher.vector_dtype=float16")
    plan = plan_run(cfg, parse_cluster(H100_64))
    assert plan.cache_gib == pytest.approx(500e6 * (768 * 2 + 440) / 2**30)


@pytest.mark.parametrize(
    ("teacher", "per_actor", "trainers", "bottleneck"),
    [(ARCTIC, 5216, 32, "train"), (MXBAI, 5216 / 3, 32, "teacher")],
)
def test_streaming_split_balances_the_stages(tmp_path, teacher, per_actor, trainers, bottleneck):
    cfg = internet_config(tmp_path, teacher, "train.data_mode=streaming")
    plan = plan_run(cfg, parse_cluster(H100_64))

    def pipeline_rate(g_s: int) -> float:  # by hand: the slower of the two stages
        return min((64 - g_s) * per_actor, g_s * hand_train_rate(4096 / g_s) * 0.9)

    legal = [g_s for g_s in range(1, 64) if 4096 % g_s == 0]  # the batch splits evenly
    assert max(legal, key=pipeline_rate) == trainers
    assert (plan.teacher_gpus, plan.trainer_gpus) == (64 - trainers, trainers)
    assert plan.teacher_gpus + plan.trainer_gpus == 64
    assert plan.bottleneck == bottleneck
    rows = 3 * 500e6  # streaming embeds every row every epoch
    assert plan.teacher_rows == plan.train_rows == rows
    assert plan.wall_hours * 3600 == pytest.approx(rows / pipeline_rate(trainers))


def test_cached_beats_streaming_over_several_epochs(tmp_path):
    cfg = internet_config(tmp_path, MXBAI)
    cluster = parse_cluster(H100_64)
    cached, streaming = (plan_mode(cfg, cluster, mode, None) for mode in ("cached", "streaming"))
    assert cached.teacher_rows == 500e6 and streaming.teacher_rows == 3 * 500e6
    assert cached.wall_hours < streaming.wall_hours


def test_streaming_on_one_gpu_shares_it(tmp_path):
    cfg = internet_config(tmp_path, ARCTIC, "train.data_mode=streaming", "train.batch_size=32")
    plan = plan_run(cfg, parse_cluster("1x(1 GPU H100)"))
    assert plan.shared_gpu and (plan.teacher_gpus, plan.trainer_gpus) == (1, 1)
    assert plan.wall_hours * 3600 == pytest.approx(3 * 500e6 * (1 / 5216 + 1 / 796))


def test_a_small_batch_trains_on_one_gpu_and_says_why(tmp_path):
    cfg = internet_config(tmp_path, ARCTIC, "train.batch_size=32")
    plan = plan_run(cfg, parse_cluster(H100_64))
    # 32 over g trainers: g x rate(32/g) x 0.9 never beats one trainer's 796 seq/s
    assert plan.trainer_gpus == 1 and plan.train_rate == pytest.approx(796)
    assert max(g * hand_train_rate(32 / g) * 0.9 for g in (2, 4, 8, 16, 32)) < 796


def test_a100_is_half_an_h100_and_h200_the_same(tmp_path):
    cfg = internet_config(tmp_path)
    h100, a100, h200 = (
        plan_run(cfg, parse_cluster(f"1x(1 GPU {gpu})")) for gpu in ("H100", "A100", "H200")
    )
    assert a100.wall_hours == pytest.approx(2 * h100.wall_hours)
    assert h200.wall_hours == pytest.approx(h100.wall_hours)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8x8 H100", "expected <nodes>x(<gpus> GPU <type>)"),
        ("8 H100", "expected <nodes>x(<gpus> GPU <type>)"),
        ("2 CPU", "expected <nodes>x(<gpus> GPU <type>)"),
        ("1x(1 GPU V100)", "unknown GPU type 'V100'; types: H100, H200, A100"),
        ("0x(8 GPU H100)", "at least 1"),
        ("99999999999999999999x(8 GPU H100)", "more than 100,000 GPUs"),
    ],
)
def test_bad_cluster_strings_are_named(value, message):
    with pytest.raises(PlanError) as err:
        parse_cluster(value)
    assert f"--cluster {value!r}" in str(err.value) and message in str(err.value)


def test_cluster_forms():
    cluster = parse_cluster(" 2 x ( 4 gpu h100 ) ")
    assert (cluster.nodes, cluster.gpus_per_node, cluster.gpus) == (2, 4, 8)
    assert cluster.label == "2x(4 GPU H100)"


def test_hub_source_without_limit_is_named(tmp_path):
    cfg = internet_config(tmp_path)
    path = tmp_path / "two.yaml"
    path.write_text(
        INTERNET.replace("TEACHER", ARCTIC).replace(
            "limit: 500000000}", "limit: 10}\n    - {hf_dataset: org/news, kind: document}"
        )
    )
    with pytest.raises(PlanError, match=r"data\.sources\.1 \(org/news\).*set its 'limit'"):
        corpus_size(load_config(path))
    assert corpus_size(cfg).texts == 500_000_000


def test_local_sources_are_counted_and_weighted(tmp_path):
    rows = [json.dumps({"text": f"t{i}", "kind": "query"}) for i in range(5)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(rows) + "\n\n")  # a trailing blank line is not a row
    pq.write_table(
        pa.table({"text": ["x", "y", "z"], "kind": ["document"] * 3}), tmp_path / "b.parquet"
    )
    (tmp_path / "cfg.yaml").write_text(
        "data:\n  sources:\n"
        "    - {path: a.jsonl.gz, weight: 2}\n"
        "    - {path: b.parquet, weight: 0.5, limit: 2}\n"
        f"teacher:\n  model: {ARCTIC}\n"
    )
    corpus = corpus_size(load_config(tmp_path / "cfg.yaml"))
    assert (corpus.texts, corpus.rows_per_epoch) == (5 + 2, 5 * 2 + 1)
    assert corpus.basis == "2 source(s): 1 by limit, 1 counted"


def test_unknown_teacher_needs_its_dim(tmp_path):
    cfg = internet_config(tmp_path, "org/my-teacher")
    with pytest.raises(PlanError, match="pass --teacher-dim"):
        plan_run(cfg, parse_cluster(H100_64))
    plan = plan_run(cfg, parse_cluster(H100_64), teacher_dim=512)
    assert (plan.teacher.dim, plan.dim_basis) == (512, "--teacher-dim")
    assert plan.cache_gib == pytest.approx(500e6 * (512 * 4 + 440) / 2**30)


def test_cli_plans_leaf_ir_on_one_a100(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = str(DEFAULT_CONFIG.parent / "leaf-ir.yaml")
    assert main(["plan", "--config", config, "--cluster", "1x(1 GPU A100)"]) == 0
    out = capsys.readouterr().out
    texts = 502_000 + 979_000 + 136_500 + 136_500 + 27_000 + 3_000_000 + 900_000
    assert f"corpus {texts:,} texts" in out
    hours = texts / 2608 / 3600 + 30 * texts / 398 / 3600  # A100: half the H100 rates
    assert f"wall time {hours:,.1f} h" in out and "bottleneck: train" in out
    assert "run it with teacher.num_actors=1 train.num_workers=1" in out
    gib = texts * (768 * 4 + 440) / 2**30
    assert f"= {gib:,.1f} GiB" in out and "18.6 GiB" in out


def test_sources_the_plan_cannot_count_are_named(tmp_path):
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(INTERNET.replace("TEACHER", ARCTIC))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "t"}\n' * 100)[:-20])
    (tmp_path / "bad.parquet").write_text("hello")
    for name, message in [
        ("empty.jsonl", "empty.jsonl: no texts"),
        ("broken.jsonl.gz", "broken.jsonl.gz: cannot be read"),
        ("bad.parquet", "bad.parquet: cannot be read"),
    ]:
        override = f"data.sources=[{{path: {tmp_path / name}, kind: query}}]"
        with pytest.raises(PlanError, match=re.escape(message)):
            corpus_size(load_config(cfg, [override]))


def test_cli_bad_cluster_exits_2(capsys):
    config = str(DEFAULT_CONFIG.parent / "leaf-ir.yaml")
    assert main(["plan", "--config", config, "--cluster", "8 H100"]) == 2
    assert "leaf-ray: error: --cluster '8 H100': expected" in capsys.readouterr().err


def test_a_batch_beyond_the_measured_ones_is_flagged(tmp_path):
    plan = plan_run(internet_config(tmp_path), parse_cluster("1x(1 GPU H100)"))
    assert plan.per_gpu_batch == 4096
    assert any("4096 > 256, the largest measured" in note for note in notes(plan))
    assert not notes(plan_run(internet_config(tmp_path), parse_cluster(H100_64)))
