"""The teacher stage and its cache: keying, dedup, resume after a kill, verify, black boxes."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
import torch
import yaml
from aiohttp import web
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense

from leaf_ray.config import TeacherConfig, load_config
from leaf_ray.data.sources import DataError
from leaf_ray.hashing import text_hash
from leaf_ray.run import RunError
from leaf_ray.storage import Location
from leaf_ray.teacher.actors import (
    TOKENS,
    TeacherEmbedder,
    TeacherTokenizer,
    embed_texts,
    teacher_calls,
)
from leaf_ray.teacher.cache import MANIFEST, SHARDS, TeacherCache
from leaf_ray.teacher.layout import StageLayout
from leaf_ray.teacher.local import LocalTeacher
from leaf_ray.teacher.space import teacher_space
from leaf_ray.teacher.stage import embed, verify_cache
from leaf_ray.train.dataset import cached_training_set, streaming_training_set
from tests.conftest import REPO, run_on_own_cluster
from tests.integration.test_http_teacher import expected, server  # noqa: F401  (the local server fixture)


def write_config(root, texts: list[dict], teacher: dict, **sections) -> object:
    """A config over `texts` (written as JSONL) with the given teacher section; returns its path."""
    (root / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    config = {
        "run": {"storage": "out"},
        "data": {"sources": [{"path": "texts.jsonl"}]},
        "teacher": {"cache_dir": "cache", **teacher},
        **sections,
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cache_rows(vectors) -> dict[bytes, np.ndarray]:
    table = pq.read_table(vectors.cache.shard_paths(vectors.cache.entries()))
    hashes = table.column("text_hash").to_pylist()
    return dict(zip(hashes, np.asarray(table.column("embedding").to_pylist()), strict=True))


def test_cache_key_changes_with_anything_that_changes_a_vector(tiny_teacher, tmp_path):
    def root(**changes):
        cfg = TeacherConfig(**{"model": str(tiny_teacher), "max_seq_length": 64, **changes})
        return TeacherCache.open(
            Location.of(tmp_path), teacher_space(cfg, on_gpu=False).key, cfg.model
        ).root

    base = root()
    assert root() == base  # same settings, same cache
    assert root(batch_size=7, num_actors=3) == base  # throughput knobs do not change vectors
    changed = [
        root(query_prompt="query: "),
        root(max_seq_length=32),
        root(vector_dtype="float16"),
        root(compute_dtype="bfloat16"),
    ]
    assert len({base, *changed}) == 5

    # The weights and vocabulary identify the teacher: a copy in another folder shares the
    # cache; a Dense head's weights or a changed vocabulary do not.
    def digest(folder: Path) -> str:
        cfg = TeacherConfig(model=str(folder), max_seq_length=64)
        return TeacherCache.open(
            Location.of(tmp_path), teacher_space(cfg, False).key, "x"
        ).root.name[-16:]

    shutil.copytree(tiny_teacher, tmp_path / "copy")
    assert digest(tmp_path / "copy") == base.name[-16:]
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teacher = SentenceTransformer(str(tiny_teacher), device="cpu")
        teacher.append(Dense(32, 16))
        teacher.save_pretrained(str(tmp_path / f"head{seed}"))
        heads.append(digest(tmp_path / f"head{seed}"))
    assert heads[0] != heads[1]
    tokenizer = json.loads((tmp_path / "copy" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a-word-of-our-own"] = vocab.pop(max(vocab, key=vocab.get))
    (tmp_path / "copy" / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert digest(tmp_path / "copy") != base.name[-16:]


def test_each_distinct_text_is_embedded_once_and_never_again(
    tiny_teacher, demo_texts, tmp_path, ray_local
):
    texts = demo_texts[:300]
    repeats = [{**t, "id": f"again-{t['id']}"} for t in texts[:40]]  # same text, other ids
    other_kind = [
        {**t, "id": f"kind-{t['id']}", "kind": "document" if t["kind"] == "query" else "query"}
        for t in texts[40:60]
    ]
    teacher = {"model": str(tiny_teacher), "max_seq_length": 64, "query_prompt": "q: "}
    cfg = load_config(write_config(tmp_path, texts + repeats + other_kind, teacher))

    first = embed(cfg)
    assert (first.plan.rows, first.plan.distinct, first.embedded) == (360, 320, 320)
    rows = cache_rows(first)
    assert len(rows) == 320  # no hash written twice
    assert verify_cache(cfg)[0].ok

    # Every text got exactly its own vector: the teacher's, with its kind's prompt.
    model = SentenceTransformer(str(tiny_teacher), device="cpu")
    model.max_seq_length = 64
    for t in texts[:5] + other_kind[:5]:
        prompt = "q: " if t["kind"] == "query" else None
        want = model.encode(t["text"], prompt=prompt)
        np.testing.assert_allclose(rows[text_hash(t["kind"], t["text"])], want, atol=1e-5)

    # One epoch's training rows: each distinct text once, or as often as its source's weight,
    # less a tenth held out for validation (with the teacher's vectors).
    data = cached_training_set(first)
    hashes = [r["text_hash"] for r in data.rows.take_all()]
    assert data.num_rows == len(hashes) == len(set(hashes)) == 320 - 32
    assert set(hashes) <= set(rows)
    texts_held, vectors_held = data.validation
    assert len(texts_held) == 32 and vectors_held.shape == (32, 32)
    untrained = sorted(set(rows) - set(hashes))  # the held-out texts carry their own vectors
    held = np.sort(vectors_held[:, 0])
    np.testing.assert_allclose(held, np.sort([rows[h][0] for h in untrained]), atol=1e-6)
    weighted = load_config(cfg.source_file, ["data.sources.0.weight=2.5"])
    data = cached_training_set(embed(weighted))
    times = Counter(r["text_hash"] for r in data.rows.take_all())
    assert data.num_rows == sum(times.values()) == 2 * 288 + 144
    assert set(times) == set(hashes) and Counter(times.values()) == {2: 144, 3: 144}

    again = embed(cfg)
    assert (again.embedded, again.cache.root) == (0, first.cache.root)
    more = load_config(write_config(tmp_path, texts + demo_texts[300:350], teacher))
    assert embed(more).embedded == 50


@pytest.fixture(scope="module")
def several_shards(tiny_teacher, demo_texts, tmp_path_factory, ray_local) -> Path:
    """A folder with a config over 800 texts and its teacher cache, embedded at batch 1: shards
    of 128 or more rows (an actor call), so several of them. Embedded once; each test changes
    a copy (`embedded_in_several_shards`)."""
    root = tmp_path_factory.mktemp("shards")
    teacher = {"model": str(tiny_teacher), "max_seq_length": 64, "batch_size": 1}
    embed(load_config(write_config(root, demo_texts[:800], teacher)))
    return root


def embedded_in_several_shards(several_shards: Path, tmp_path: Path):
    """The config and its teacher vectors, in a copy of `several_shards` under `tmp_path`."""
    shutil.copytree(several_shards, tmp_path, dirs_exist_ok=True)
    cfg = load_config(tmp_path / "cfg.yaml")
    vectors = embed(cfg)
    assert vectors.embedded == 0 and vectors.cache.root.path.startswith(str(tmp_path))
    return cfg, vectors


def rewrite_entry(root: Path, name: str, **changes) -> None:
    """Change shard `name`'s entry in the manifest file that holds it."""
    for file in (root / MANIFEST).glob("*.json"):
        entries = json.loads(file.read_text())
        if any(e["shard"] == name for e in entries):
            entries = [e | changes if e["shard"] == name else e for e in entries]
            file.write_text(json.dumps(entries))


def test_verify_finds_missing_duplicated_and_corrupt_rows(several_shards, tmp_path):
    cfg, vectors = embedded_in_several_shards(several_shards, tmp_path)
    cache = vectors.cache
    assert verify_cache(cfg)[0].ok
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "no vector", "kind": "query"}))
    more = load_config(
        cfg.source_file, ['data.sources=[{"path": "texts.jsonl"}, {"path": "more.jsonl"}]']
    )
    assert verify_cache(more)[0].missing == 1  # a text with no vector

    entries = cache.entries()
    assert len(entries) >= 3
    assert len(list((tmp_path / "cache").glob(f"*/{MANIFEST}/*.json"))) == 1  # one per write
    # A shard committed twice: every one of its rows is a duplicate, counted but not a failure.
    root = Path(cache.root.path)
    shard = root / SHARDS / entries[0]["shard"]
    shutil.copy(shard, root / SHARDS / "copy.parquet")
    (root / MANIFEST / "copy.parquet.json").write_text(
        json.dumps([{**entries[0], "shard": "copy.parquet"}])
    )
    report = verify_cache(cfg)[0]
    assert report.duplicated == entries[0]["rows"] and report.ok
    # Training reads skip the later copy: each text comes once an epoch, as planned.
    data = cached_training_set(embed(cfg))
    trained = Counter(r["text_hash"] for r in data.rows.take_all())
    assert data.num_rows == trained.total() and set(trained.values()) == {1}

    # Bytes changed on disk after commit: the checksum catches it.
    other = root / SHARDS / entries[1]["shard"]
    data = bytearray(other.read_bytes())
    data[len(data) // 2] ^= 0xFF
    other.write_bytes(bytes(data))
    assert any(entries[1]["shard"] in p for p in verify_cache(cfg)[0].corrupt)

    # A row whose text no longer matches its hash, or whose vector is not unit length.
    third = root / SHARDS / entries[2]["shard"]
    table = pq.read_table(third)
    texts = table.column("text").to_pylist()
    texts[3] = texts[3] + " (edited)"
    table = table.set_column(2, "text", pa.array(texts))
    pq.write_table(table, third)
    rewrite_entry(root, entries[2]["shard"], sha256=hashlib.sha256(third.read_bytes()).hexdigest())
    corrupt = verify_cache(cfg)[0].corrupt
    assert any(f"{entries[2]['shard']}: row 3" in p for p in corrupt), corrupt


def test_a_cache_is_read_in_the_order_of_its_texts_not_of_names_or_vector_bits(
    several_shards, tmp_path
):
    """Shards are named at random when written, and another CPU computes other last bits of the
    same vectors: the same texts embedded again from scratch must still be read (hence trained
    on) in the same order."""
    cfg, vectors = embedded_in_several_shards(several_shards, tmp_path)
    cache, root = vectors.cache, Path(vectors.cache.root.path)

    def texts_in_read_order() -> list:
        return pq.read_table(cache.shard_paths(cache.entries()))["text"].to_pylist()

    read = texts_in_read_order()
    trained = [r["text"] for r in cached_training_set(vectors).rows.take_all()]
    paths = cache.shard_paths(cache.entries())
    assert len(paths) >= 3
    # New names that sort the other way round from the order the shards are read in, and each
    # vector's last bit flipped.
    for rank, path in enumerate(paths):
        old = Path(path).name
        new = f"{len(paths) - rank:04d}-renamed.parquet"
        table = pq.read_table(path)
        values = np.asarray(table["embedding"].combine_chunks().flatten())
        bits = values.view(f"u{values.itemsize}") ^ 1
        flipped = pa.FixedSizeListArray.from_arrays(pa.array(bits.view(values.dtype)), 32)
        pq.write_table(table.set_column(3, "embedding", flipped), root / SHARDS / new)
        Path(path).unlink()
        sha = hashlib.sha256((root / SHARDS / new).read_bytes()).hexdigest()
        rewrite_entry(root, old, shard=new, sha256=sha)
    assert texts_in_read_order() == read
    again = [r["text"] for r in cached_training_set(embed(cfg)).rows.take_all()]
    assert again == trained


def test_a_shard_failing_its_check_is_set_aside_and_its_texts_embedded_again(
    several_shards, tmp_path
):
    cfg, vectors = embedded_in_several_shards(several_shards, tmp_path)
    cache = vectors.cache
    entries = cache.entries()
    root = Path(cache.root.path)
    flipped, footer = (root / SHARDS / entries[i]["shard"] for i in (0, 1))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the body
    flipped.write_bytes(bytes(data))
    footer.write_bytes(footer.read_bytes()[:-10])  # a broken footer
    report, moved = verify_cache(cfg)
    assert len(report.corrupt) == 2 and moved == []  # verify alone only reports
    # A cache_dir with no cache for this teacher (a typo): refused, and none is made there.
    typo = load_config(tmp_path / "cfg.yaml", [f"teacher.cache_dir={tmp_path / 'typo'}"])
    with pytest.raises(RunError, match="no teacher cache for this config"):
        verify_cache(typo)
    assert not (tmp_path / "typo").exists()

    report, moved = verify_cache(cfg, repair=True)
    assert sorted(moved) == sorted(
        [f"{entries[0]['shard']}: sha256 differs from the manifest"]
        + [f"{entries[1]['shard']}: sha256 differs from the manifest"]
    )
    assert report.corrupt == [] and report.missing == entries[0]["rows"] + entries[1]["rows"]
    assert sorted(p.name for p in (root / "set_aside").iterdir()) == sorted(
        [entries[0]["shard"], f"{entries[0]['shard']}.json"]
        + [entries[1]["shard"], f"{entries[1]['shard']}.json"]
    )
    # Found where it is read, too: the next embed sets a bad shard aside itself, and embeds its
    # texts again with those of the shards the repair set aside.
    read_bad = root / SHARDS / entries[2]["shard"]
    read_bad.write_bytes(read_bad.read_bytes()[:-10])
    again = embed(cfg)
    assert again.embedded == sum(entries[i]["rows"] for i in (0, 1, 2))
    assert (root / "set_aside" / entries[2]["shard"]).is_file()
    assert verify_cache(cfg)[0].ok


@pytest.mark.cluster
def test_a_killed_embed_resumes_and_embeds_each_text_exactly_once(demo_texts, tmp_path, ray_local):
    """A real kill -9 of `leaf-ray embed` (driver, local Ray and actors) midway, then a rerun."""
    texts = demo_texts[:2000]
    # batch 2: a shard per 256 texts, so the kill lands between shards
    teacher = {"model": "sentence-transformers/all-MiniLM-L6-v2", "batch_size": 2, "num_actors": 1}
    path = write_config(tmp_path, texts, teacher, ray={"num_cpus": 2})
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "leaf_ray.cli", "embed", "--config", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    committed: list = []
    deadline = time.monotonic() + 240
    while not committed and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        committed = list((tmp_path / "cache").glob(f"*/{MANIFEST}/*.json"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert committed, "no shard was committed before the kill"
    rows = {e["shard"]: e["rows"] for p in committed for e in json.loads(p.read_text())}
    rows_before = sum(rows.values())
    assert 0 < rows_before < len(texts)

    resumed = embed(load_config(path))
    assert resumed.embedded == len(texts) - rows_before  # only what was missing
    report = verify_cache(load_config(path))[0]
    assert report.ok and report.rows == len(texts), report
    assert embed(load_config(path)).embedded == 0


def test_precomputed_vectors_are_a_teacher(tiny_teacher, demo_texts, tmp_path, ray_local):
    texts = demo_texts[:200]
    model = SentenceTransformer(str(tiny_teacher), device="cpu")
    vectors = model.encode([t["text"] for t in texts]).astype(np.float16)
    file = tmp_path / "vectors.parquet"
    table = pa.table(
        {
            "id": [t["id"] for t in texts],
            "text": [t["text"] for t in texts],
            "kind": [t["kind"] for t in texts],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 32),
        }
    )
    pq.write_table(table, file)
    teacher = {"model": "all-mpnet-base-v2 (precomputed)", "vectors": "vectors.parquet"}
    student = {"init": "pretrained", "model": str(tiny_teacher)}
    result = embed(load_config(write_config(tmp_path, texts, teacher, student=student)))
    assert result.space.dimension == 32 and result.space.normalized
    rows = cache_rows(result)
    for t, v in zip(texts, vectors, strict=True):
        np.testing.assert_array_equal(rows[text_hash(t["kind"], t["text"])], v.astype(np.float32))

    extra = texts + [{"id": "new", "text": "a text the file lacks", "kind": "query"}]
    missing = (
        r"vectors.parquet: no vector for 1 text\(s\) of the sources \(first: .*texts.jsonl:201\)"
    )
    with pytest.raises(DataError, match=missing):
        embed(load_config(write_config(tmp_path, extra, teacher, student=student)))


def test_http_teacher_through_ray_with_a_flaky_server(server, demo_texts, tmp_path, ray_local):  # noqa: F811
    async def flaky(batch: list[str], tries: int) -> web.Response | None:
        if tries == 1 and hash(batch[0]) % 3 == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        return None

    server.policy = flaky
    texts = demo_texts[:150]
    teacher = {
        "model": "remote-teacher",
        "query_prompt": "query: ",
        "http": {"url": server.url, "texts_per_request": 16, "max_concurrency": 4},
    }
    student = {"init": "pretrained", "model": "sentence-transformers/all-MiniLM-L6-v2"}
    result = embed(load_config(write_config(tmp_path, texts, teacher, student=student)))
    assert result.embedded == 150 and server.statuses[503] > 0
    rows = cache_rows(result)
    inputs = [("query: " if t["kind"] == "query" else "") + t["text"] for t in texts]
    got = np.stack([rows[text_hash(t["kind"], t["text"])] for t in texts])
    np.testing.assert_allclose(got, expected(inputs), rtol=1e-6)


def test_warm_up_runs_every_padded_width_and_leaves_vectors_alone(tiny_teacher, demo_texts):
    """The GPU warm-up (run here on CPU): a full batch at each width a GPU call can pad to,
    longest first; the teacher's vectors are the model's own afterwards."""
    cfg = TeacherConfig(model=str(tiny_teacher), max_seq_length=60, batch_size=16)
    teacher = LocalTeacher(cfg, "cpu")
    shapes = []
    forward = teacher._forward

    def recording(order, batches):
        shapes.extend(tuple(batch["input_ids"].shape) for batch in batches)
        return forward(order, batches)

    teacher._forward = recording
    teacher._warm_up()
    assert shapes == [(16, 60)] + [(16, width) for width in range(56, 0, -8)]
    texts = [t["text"] for t in demo_texts[:50]]
    model = SentenceTransformer(str(tiny_teacher), device="cpu")
    model.max_seq_length = 60
    np.testing.assert_allclose(teacher.embed(texts, "document"), model.encode(texts), atol=1e-5)


def test_a_text_repeated_in_a_source_without_ids_is_one_text(
    tiny_teacher, demo_texts, tmp_path, ray_local
):
    """Without an id field a row's id is its content hash, so a repeated text repeats its
    (hash, id) too: it is still embedded, cached and trained on as one text."""
    texts = [{"text": t["text"], "kind": t["kind"]} for t in demo_texts[:100]]
    texts += texts[:20]
    teacher = {"model": str(tiny_teacher), "max_seq_length": 64}
    cfg = load_config(write_config(tmp_path, texts, teacher, train={"validation_texts": 5}))

    vectors = embed(cfg)
    assert (vectors.plan.rows, vectors.plan.distinct, vectors.embedded) == (120, 100, 100)
    cached = cache_rows(vectors)
    assert len(cached) == 100 and verify_cache(cfg)[0].ok
    data = cached_training_set(vectors)
    assert data.num_rows == data.rows.count() == 95

    # Streaming mode (none held out here: no second teacher pass for them) streams each
    # distinct text once, with the vector the cache holds.
    no_validation = load_config(cfg.source_file, ["train.validation_texts=0"])
    _, data = streaming_training_set(no_validation)
    streamed = data.rows.select_columns(["text_hash", "embedding"]).take_all()
    hashes = Counter(r["text_hash"] for r in streamed)
    assert data.num_rows == sum(hashes.values()) == 100 and set(hashes.values()) == {1}
    assert data.validation is None
    for row in streamed:
        np.testing.assert_allclose(row["embedding"], cached[row["text_hash"]], atol=1e-5)


def test_on_gpus_tokenizer_actors_feed_the_teacher(tiny_teacher, demo_texts, tmp_path, ray_local):
    """The GPU layout, on a Ray that declares a GPU (tests/fake_gpu.py): CPU actors tokenize,
    the GPU actor only pads and runs the model, and every text gets its own vector."""
    texts = demo_texts[:300]
    teacher = {"model": str(tiny_teacher), "max_seq_length": 64, "query_prompt": "q: "}
    path = write_config(tmp_path, texts, teacher | {"batch_size": 16})
    report = run_on_own_cluster("fake_gpu", path, timeout=400)
    assert report["embedded"] == 300
    classes = Counter(a["class"] for a in report["actors"])
    reserved = {a["class"]: a["resources"] for a in report["actors"]}
    tokenizer = next(c for c in classes if "TeacherTokenizer" in c)
    teacher = next(c for c in classes if "TeacherEmbedder" in c)
    # 4 CPUs: one for the teacher actor, one left to Ray Data's tasks, two tokenizer actors.
    assert classes == {tokenizer: 2, teacher: 1}
    assert reserved[tokenizer] == {"CPU": 1.0} and reserved[teacher] == {"CPU": 1.0, "GPU": 1.0}

    table = pq.read_table(report["shards"])
    rows = dict(zip(table["text_hash"].to_pylist(), table["embedding"].to_pylist(), strict=True))
    model = SentenceTransformer(str(tiny_teacher), device="cpu")
    model.max_seq_length = 64
    for kind, prompt in (("query", "q: "), ("document", None)):
        mine = [t["text"] for t in texts if t["kind"] == kind]
        got = np.stack([rows[text_hash(kind, t)] for t in mine])
        np.testing.assert_allclose(got, model.encode(mine, prompt=prompt), atol=1e-5)


def test_tokens_from_tokenizer_actors_embed_as_texts_do(tiny_teacher, demo_texts):
    """`TeacherTokenizer`'s columns through `TeacherEmbedder` give the vectors of texts embedded
    in the actor, and padding lands on the tokenizer's side."""
    cfg = TeacherConfig(
        model=str(tiny_teacher), max_seq_length=64, batch_size=16, query_prompt="q: "
    )
    rows = demo_texts[:100]
    calls = pa.table({"text": [r["text"] for r in rows], "kind": [r["kind"] for r in rows]})
    tokenizer = TeacherTokenizer(cfg)
    assert {p.device.type for p in tokenizer.model.parameters()} == {"meta"}  # no weights held
    tokenized = tokenizer(calls)
    embedder = TeacherEmbedder(cfg, torch_threads=1)
    from_tokens = embedder(
        {n: tokenized[n].to_numpy(zero_copy_only=False) for n in tokenized.column_names}
    )
    from_texts = embedder({n: calls[n].to_numpy(zero_copy_only=False) for n in calls.column_names})
    assert sorted(from_tokens) == ["embedding", "kind", "text"]
    np.testing.assert_allclose(from_tokens["embedding"], from_texts["embedding"], atol=1e-6)

    teacher = embedder.teacher
    ids = tokenized[TOKENS + "input_ids"].to_pylist()
    pad = teacher.model.tokenizer.pad_token_id
    for side in ("right", "left"):
        teacher.model.tokenizer.padding_side = side
        order, batches = teacher._batches(
            {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        )
        padded, mask = batches[0]["input_ids"].tolist(), batches[0]["attention_mask"].tolist()
        for row, seq, seq_mask in zip(order[:16], padded, mask, strict=True):
            fill = [pad] * (len(seq) - len(ids[row]))
            assert seq == (ids[row] + fill if side == "right" else fill + ids[row])
            assert (
                sum(seq_mask) == len(ids[row]) and seq_mask[len(fill) if side == "left" else 0] == 1
            )


def test_teacher_calls_gather_the_tokenizer_actors_blocks(tiny_teacher, demo_texts, ray_local):
    """Tokenizer actors take blocks of a fraction of a call (so that many tokenize one call at
    once); each teacher call gathers a whole call's rows from them, and every text still gets
    its own vector."""
    cfg = TeacherConfig(model=str(tiny_teacher), max_seq_length=64, batch_size=16)
    layout = StageLayout(0, 0.25, 1, tokenizers=1, rows_per_call=64, rows_per_block=16)
    rows = demo_texts[:200]
    # Made first: the actors hold 1.25 of the tests' 2 CPUs, too few for repartition's tasks.
    texts = ray.data.from_items(rows, override_num_blocks=1)
    calls = teacher_calls(texts, layout).materialize()
    assert {len(b["text"]) for b in calls.iter_batches(batch_size=None)} == {16, 8}
    calls_made = list(embed_texts(calls, cfg, layout).iter_batches(batch_size=None))
    assert sorted(len(c["text"]) for c in calls_made) == [8, 64, 64, 64]
    model = SentenceTransformer(str(tiny_teacher), device="cpu")
    model.max_seq_length = 64
    texts = np.concatenate([c["text"] for c in calls_made]).tolist()
    np.testing.assert_allclose(
        np.concatenate([c["embedding"] for c in calls_made]), model.encode(texts), atol=1e-5
    )
