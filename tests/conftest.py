import gzip
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from moto.server import ThreadedMotoServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A local Ray is never drained: Ray Train's preemption watcher would be one more actor process
# (Ray's boot and imports) in every training run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's controller looks at its workers every 2 s by default, so each training run waits
# up to that at its start, at every checkpoint and at its end; a local Ray answers at once.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# The local S3 server's (tests/test_storage.py): set before any Ray starts, so workers have them,
# as a cluster's nodes would have real ones (storage URIs may not carry credentials).
os.environ["AWS_ACCESS_KEY_ID"] = os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo"


def random_bert(folder: Path, hidden: int, layers: int):
    """A randomly initialised BERT encoder with MiniLM's real tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from leaf_ray.config import ModelRef
    from leaf_ray.models import resolve_model

    minilm = resolve_model(ModelRef(model="sentence-transformers/all-MiniLM-L6-v2"))
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
    )
    bert = BertModel(config)
    tokenizer.save_pretrained(folder)
    return bert


def tiny_run_config(
    root: Path,
    texts: list[dict],
    teacher_model: Path,
    name: str,
    caches: Path | None = None,
    **sections,
) -> Path:
    """`<name>.yaml` for a tiny run over `texts` (written as JSONL): the tiny teacher, max length
    64, 2 DDP workers sharing the tests' 2 CPUs; its teacher and eval caches under `caches`
    when given (`shared_caches`), else under the run's storage; each of `sections` updates its
    section."""
    (root / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    config = {
        "run": {"name": name, "storage": "out"},
        "data": {"sources": [{"path": "texts.jsonl"}]},
        "teacher": {"model": str(teacher_model), "max_seq_length": 64},
        "student": {"max_seq_length": 64},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5},
    }
    if caches:
        config["teacher"]["cache_dir"] = str(caches / "teacher")
        config["eval"] = {"cache_dir": str(caches / "eval")}
    for section, values in sections.items():
        config[section] = config.get(section, {}) | values
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A random 2-layer, 32-d BERT sentence-transformer: mean pooling, normalised."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    bert = random_bert(root / "hf", hidden=32, layers=2)
    # Without position/segment signal the random encoder is a bag-of-words hash: texts sharing
    # words get similar vectors, so retrieval scores mean something even with random weights.
    with torch.no_grad():
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
    bert.save_pretrained(root / "hf")
    encoder = Transformer(str(root / "hf"), max_seq_length=64)
    teacher = SentenceTransformer(modules=[encoder, Pooling(32, "mean"), Normalize()], device="cpu")
    teacher.save_pretrained(str(root / "teacher"))
    return root / "teacher"


@pytest.fixture(scope="session")
def shared_caches(tmp_path_factory) -> Path:
    """Teacher and eval caches shared by the tests' tiny runs (`tiny_run_config(caches=...)`): a
    text or eval set the tiny teacher embedded for one test is read from the cache by the next,
    which starts no teacher actor. Only for tests that count no embeddings."""
    return tmp_path_factory.mktemp("caches")


@pytest.fixture(scope="session")
def demo_texts() -> list[dict]:
    with gzip.open(DEMO_DATA / "train.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in itertools.islice(f, 2000)]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # Idle workers stay for the session (Ray keeps num_cpus of them, for a second): a task
    # worker that has imported torch and sentence-transformers serves the next test's tasks
    # instead of a new process importing them again.
    ray.init(
        address="local",  # never another test's Ray
        num_cpus=2,
        include_dashboard=False,
        _system_config={
            "num_workers_soft_limit": 8,
            "idle_worker_killing_time_threshold_ms": 3_600_000,
        },
    )
    yield
    ray.shutdown()


def run_on_own_cluster(script: str, config: Path, timeout: int) -> dict:
    """Run `python -m tests.<script> CONFIG`, which starts a Ray cluster of its own (this
    process already runs the tests' local Ray), and return the JSON it prints after
    `<SCRIPT> `."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", f"tests.{script}", str(config)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    tag = f"{script.upper()} "
    return json.loads(next(s for s in done.stdout.splitlines() if s.startswith(tag))[len(tag) :])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_uri():
    """s3://leaf on a local S3 server: the endpoint travels in the URI, the credentials in the
    environment (tests/conftest.py)."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir("leaf")
    yield f"s3://leaf?scheme=http&endpoint_override={endpoint}&region=us-east-1"
    server.stop()


def under(uri: str, path: str) -> str:
    bucket, query = uri.split("?")
    return f"{bucket}/{path}?{query}"
