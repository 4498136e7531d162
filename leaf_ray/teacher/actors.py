"""The teacher stage's Ray Data actors: tokenizer actors (CPU) feeding teacher actors (GPU or
CPU)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.json
import ray
import ray.data
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer
from transformers import AutoModel

from leaf_ray.config import TeacherConfig
from leaf_ray.data.sources import KINDS
from leaf_ray.teacher.backends import load_teacher, open_teacher, teacher_prompts, tokenize
from leaf_ray.teacher.layout import StageLayout

TOKENS = "_teacher_tokens."  # column prefix for token values between the tokenizer and teacher


def _empty_encoder(module: Transformer, name: str, task: str, config, *args, **kwargs):
    with torch.device("meta"):
        return AutoModel.from_config(config)


class _WithoutWeights(SentenceTransformer):
    """Loads every `Transformer` module of a saved model with `_empty_encoder` in place of its
    `_load_model`: the module's tokenizer and settings as saved, its encoder built empty."""

    def _load_module_class_from_ref(self, class_ref: str, *args, **kwargs) -> type:
        module_class = super()._load_module_class_from_ref(class_ref, *args, **kwargs)
        if issubclass(module_class, Transformer):
            return type(
                module_class.__name__,
                (module_class,),
                {"_load_model": _empty_encoder, "__module__": __name__},
            )
        return module_class


def load_without_weights(cfg: TeacherConfig) -> SentenceTransformer:
    """The teacher's modules and tokenizer, its encoder built empty on the meta device: all
    `preprocess` needs, without a copy of the weights in every tokenizer actor (a 7B teacher
    would take 28 GB each). Hand-written: transformers builds empty models from pretrained
    folders only through accelerate, which would also fetch the weights of a hub model. Where
    the encoder cannot be built so (a sentence-transformers without these hooks, a model class
    `AutoModel` does not know), the weights load. Either way no vector comes from these
    weights: their sha256 pin is left to the actors that embed, rather than every tokenizer
    actor fetching and hashing them."""
    try:
        return load_teacher(cfg, "meta", check_pin=False, model_class=_WithoutWeights)
    except (AttributeError, TypeError, ValueError, KeyError):
        return load_teacher(cfg, "cpu", check_pin=False)


class TeacherTokenizer:
    """A CPU Ray Data actor that tokenizes calls for GPU teacher actors. Tokenizing in the
    teacher's process holds its GIL ~70 µs a row (transformers' and sentence-transformers'
    Python around the Rust tokenizer, profiled on CPU): a ceiling near 14k rows/s, below what
    one GPU runs bert-base at, and taken from the thread that feeds the GPU."""

    def __init__(self, cfg: TeacherConfig):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core each: the actor reserves one
        self.model = load_without_weights(cfg)
        self.prompts = teacher_prompts(cfg, self.model)

    def __call__(self, calls: pa.Table) -> pa.Table:
        kinds = calls["kind"].to_numpy(zero_copy_only=False)
        texts = calls["text"].to_pylist()
        columns: dict[str, list] = {}
        for kind in KINDS:
            rows = np.flatnonzero(kinds == kind)
            if rows.size:
                features = tokenize(self.model, [texts[i] for i in rows], self.prompts[kind])
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
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # on CPU the cores belong to the forward
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            os.environ["RAYON_NUM_THREADS"] = str(torch_threads)
        torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
        self.teacher = open_teacher(cfg, device)

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
