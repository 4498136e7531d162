"""Evaluation tasks: mteb's by name, or a local folder in BEIR layout as an mteb retrieval task."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leaf_ray.config import EvalConfig
from leaf_ray.data.beir import load_beir
from leaf_ray.hashing import files_sha256

if TYPE_CHECKING:
    from mteb.abstasks.retrieval import AbsTaskRetrieval


class EvalError(ValueError):
    """An eval task that cannot be found or is not a retrieval task."""


@dataclass(frozen=True)
class EvalTask:
    """A retrieval task: a local BEIR-layout folder, or an mteb task by name."""

    name: str
    revision: str  # the data's content hash (local) or the dataset revision (mteb)
    main_score: str = "ndcg_at_10"
    folder: str | None = None
    split: str = "test"

    def load(self) -> AbsTaskRetrieval:
        import mteb

        return mteb.get_task(self.name) if self.folder is None else _local_task(self)


def resolve_tasks(cfg: EvalConfig) -> list[EvalTask]:
    """Local folders (their data is validated and hashed here) and mteb tasks or benchmarks by
    name (metadata only: nothing is downloaded until a task runs)."""
    tasks = [
        EvalTask(Path(f).name, _folder_revision(Path(f), cfg.split), folder=f, split=cfg.split)
        for f in cfg.datasets
    ]
    if cfg.mteb_tasks:
        import mteb

        for name in cfg.mteb_tasks:
            for task in _mteb_tasks(mteb, name):
                meta = task.metadata
                if meta.type != "Retrieval":
                    raise EvalError(
                        f"eval.mteb_tasks: {meta.name} is a {meta.type} task; leaf-ray "
                        "evaluates retrieval tasks (a query side and a document side)"
                    )
                revision = meta.dataset.get("revision") or "main"
                tasks.append(EvalTask(meta.name, revision, meta.main_score))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"eval: two tasks share a name: {sorted(names)}")
    return tasks


def _mteb_tasks(mteb: Any, name: str) -> list:
    try:
        return list(mteb.get_benchmark(name).tasks)
    except (KeyError, ValueError):
        pass
    try:
        return [mteb.get_task(name)]
    except (KeyError, ValueError):
        msg = f"eval.mteb_tasks: {name!r} is neither an mteb task nor a benchmark"
        raise EvalError(msg) from None


def _folder_revision(folder: Path, split: str) -> str:
    load_beir(folder, split)  # bad files fail here, naming file and line, before any Ray task
    files = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    return hashlib.sha256("".join(files_sha256(f) for f in files).encode()).hexdigest()[:16]


def _local_task(spec: EvalTask) -> AbsTaskRetrieval:
    """A BEIR-layout folder as an mteb retrieval task (mteb's own loader wants the hub)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=spec.name,
            description=f"BEIR-layout folder {spec.folder}",
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            dataset={"path": str(spec.folder), "revision": spec.revision},
            eval_splits=[spec.split],
            eval_langs=["eng-Latn"],
            main_score=spec.main_score,
        )

        def load_data(self, **kwargs: Any) -> None:
            rs = load_beir(spec.folder, spec.split)
            split = {
                "corpus": Dataset.from_dict({"id": [*rs.corpus], "text": [*rs.corpus.values()]}),
                "queries": Dataset.from_dict({"id": [*rs.queries], "text": [*rs.queries.values()]}),
                "relevant_docs": rs.qrels,
                "top_ranked": None,
            }
            self.dataset = {"default": {spec.split: split}}
            self.data_loaded = True

    return LocalRetrieval()


# mode -> (model encoding the queries, model encoding the documents)
MODES = {
    "teacher": ("teacher", "teacher"),
    "pretrained": ("pretrained", "pretrained"),
    "student_init": ("student_init", "student_init"),
    "student": ("student", "student"),
    "asymmetric_init": ("student_init", "teacher"),
    "asymmetric": ("student", "teacher"),
}


# mode -> the mode it started from: distillation's change is the difference
STARTS = {"student_init": "pretrained", "student": "student_init", "asymmetric": "asymmetric_init"}


SIDES = ("query", "document")
