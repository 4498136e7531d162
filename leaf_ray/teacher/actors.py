"""The teacher stage's Ray Data actors: tokenizer actors (CPU) feeding teacher actors (GPU or
CPU)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow as pa
import pyarrow.json
import ray
import ray.data

from leaf_ray.config import TeacherConfig
from leaf_ray.data.sources import KINDS
from leaf_ray.teacher.backends import HttpTeacher, Teacher, teacher_prompts
from leaf_ray.teacher.layout import StageLayout

TOKENS = "_teacher_tokens."  # column prefix for token values between the tokenizer and teacher


class TeacherTokenizer:
    """A CPU Ray Data actor that tokenizes calls for GPU teacher actors. Tokenizing in the
    teacher's process holds its GIL ~70 µs a row (transformers' and sentence-transformers'
    Python around the Rust tokenizer, profiled on CPU): a ceiling near 14k rows/s, below what
    one GPU runs bert-base at, and taken from the thread that feeds the GPU."""

    def __init__(self, cfg: TeacherConfig):
        from leaf_ray.teacher.local import load_without_weights, tokenize  # see `open_teacher`

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core each: the actor reserves one
        self.model = load_without_weights(cfg)
        self.prompts = teacher_prompts(cfg, self.model)
        self.tokenize = functools.partial(tokenize, self.model)

    def __call__(self, calls: pa.Table) -> pa.Table:
        kinds = calls["kind"].to_numpy(zero_copy_only=False)
        texts = calls["text"].to_pylist()
        columns: dict[str, list] = {}
        for kind in KINDS:
            rows = np.flatnonzero(kinds == kind)
            if rows.size:
                features = self.tokenize([texts[i] for i in rows], self.prompts[kind])
                for name, values in features.items():
                    if isinstance(values, list):
                        column = columns.setdefault(name, [None] * len(texts))
                        for row, value in zip(rows, values, strict=True):
                            column[row] = value
        for name, column in columns.items():
            calls = calls.append_column(TOKENS + name, pa.array(column, pa.list_(pa.int32())))
        return calls


class TeacherEmbedder:
    """One Ray Data actor: holds the teacher (on its GPU, if any) and embeds a batch, kind by
    kind, each kind with its own prompt; from the texts, or from `TeacherTokenizer`'s tokens."""

    def __init__(self, cfg: TeacherConfig, torch_threads: int):
        self.teacher = open_teacher(cfg, torch_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = {name: v for name, v in batch.items() if name.startswith(TOKENS)}
        embeddings = None
        for kind in KINDS:
            rows = batch["kind"] == kind
            if not rows.any():
                continue
            if tokens:
                own = {name.removeprefix(TOKENS): values[rows] for name, values in tokens.items()}
                vectors = self.teacher.embed_tokens(own, kind)
            else:
                vectors = self.teacher.embed(batch["text"][rows].tolist(), kind)
            if embeddings is None:
                embeddings = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
            embeddings[rows] = vectors
        rest = {name: values for name, values in batch.items() if name not in tokens}
        return {**rest, "embedding": embeddings}


def open_teacher(cfg: TeacherConfig, torch_threads: int) -> Teacher:
    """The config's backend (precomputed vectors never reach an actor: they are ingested into the
    cache). The local one is imported only here: Ray Train's controller and Ray Data's
    coordinators unpickle this module's actor classes with the pipeline, and an HTTP teacher runs
    no model; none of them needs torch or sentence-transformers (seconds of imports and hundreds
    of MB in each process)."""
    if cfg.backend == "http":
        return HttpTeacher(cfg)
    from leaf_ray.teacher.local import local_teacher

    return local_teacher(cfg, torch_threads)


def teacher_calls(texts: ray.data.Dataset, layout: StageLayout) -> ray.data.Dataset:
    """The texts in the layout's blocks, ready for `embed_texts`."""
    return texts.repartition(target_num_rows_per_block=layout.rows_per_block)


def embed_texts(
    calls: ray.data.Dataset, cfg: TeacherConfig, layout: StageLayout
) -> ray.data.Dataset:
    """Add the teacher's `embedding` column to `teacher_calls` blocks; lazy, so it can feed
    training or be written out."""
    if layout.tokenizers:
        calls = calls.map_batches(
            TeacherTokenizer,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=layout.rows_per_block,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=layout.tokenizers),
            num_cpus=1,
        )
    # Two calls run at once in an actor (threads): one is tokenized or padded while the other
    # computes.
    return calls.map_batches(
        TeacherEmbedder,
        fn_constructor_kwargs={"cfg": cfg, "torch_threads": layout.torch_threads},
        batch_size=layout.rows_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=cfg.num_actors,
            max_tasks_in_flight_per_actor=3,
            max_concurrent_calls_per_actor=2,
            enable_true_multi_threading=True,  # safe: one device thread per teacher
        ),
        num_gpus=layout.gpus,
        num_cpus=layout.cpus,  # Ray Data spreads its actors over the nodes by default
    )
