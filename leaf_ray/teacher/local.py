"""The local backend: a sentence-transformers teacher run on this process's device, and its
skeleton (tokenizer and settings, no weights) for tokenizer actors. Kept apart because it imports
torch and sentence-transformers: the modules whose classes and functions Ray unpickles with the
pipeline (actors, backends, http, vectors, cache) import neither, so processes that run no model
(Ray Train's controller, Ray Data's coordinators, HTTP teacher actors) never load them."""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.sentence_transformer.modules import Normalize
from transformers import AutoModel

from leaf_ray.config import TeacherConfig
from leaf_ray.data.sources import KINDS
from leaf_ray.models import resolve_model
from leaf_ray.progress import quiet_weight_loading
from leaf_ray.teacher.backends import teacher_prompts


def load_teacher(
    cfg: TeacherConfig,
    device: str | None = None,
    check_pin: bool = True,
    model_class: type[SentenceTransformer] = SentenceTransformer,
) -> SentenceTransformer:
    quiet_weight_loading()
    model = model_class(resolve_model(cfg, check_pin), device=device, revision=cfg.revision)
    model.max_seq_length = cfg.max_seq_length
    return model


def normalizes(model: SentenceTransformer) -> bool:
    return any(isinstance(module, Normalize) for module in model)


def compute_dtype(cfg: TeacherConfig, device: str) -> torch.dtype:
    if cfg.compute_dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, cfg.compute_dtype)


class LocalTeacher:
    """A sentence-transformers model run by hand rather than through `encode()`:
    - a call is tokenized once, unpadded, by the model's own `preprocess` (prompts included),
      here or beforehand by `TeacherTokenizer` actors, then batched by exact token length, so
      batches carry almost no padding;
    - in a threaded actor the next call is tokenized and padded while this one runs on the
      device: the device thread only copies batches over and runs the model;
    - autocast (bf16 on GPU by default), and one device-to-host copy per call."""

    def __init__(self, cfg: TeacherConfig, device: str):
        self.model = load_teacher(cfg, device).eval()
        self.device, self.batch_size = device, cfg.batch_size
        self.dtype = compute_dtype(cfg, device)
        self.prompts = teacher_prompts(cfg, self.model)
        # What `preprocess` gives per call rather than per row (modality, prompt length).
        self.per_call = {
            kind: {
                name: value
                for name, value in tokenize(self.model, ["x"], self.prompts[kind]).items()
                if not isinstance(value, list)
            }
            for kind in KINDS
        }
        self.tokenizing = threading.Lock()
        # Every forward runs on this one thread: one device queue, and on CPU one OpenMP team
        # (a team per calling thread would spin against the other on the same cores).
        self.device_thread = ThreadPoolExecutor(max_workers=1)
        if device == "cuda":
            self._warm_up()

    def _warm_up(self) -> None:
        """One full batch at every padded width, longest first: measured on an H100, a call whose
        shapes are new ran at a third of the speed of the same call again (allocator growth and
        kernel selection), which would otherwise be paid during the stage."""
        sample = tokenize(self.model, ["warm up"], None)
        limit = self.model.max_seq_length
        widths = {padded_width(n, limit, True) for n in range(1, limit + 1)}
        for width in sorted(widths, reverse=True):
            features = {
                name: [values[0][:1] * width] * self.batch_size
                if isinstance(values, list)
                else values
                for name, values in sample.items()
            }
            self._forward(*self._batches(features))

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        with self.tokenizing:
            features = tokenize(self.model, texts, self.prompts[kind])
            order, batches = self._batches(features)
        return self.device_thread.submit(self._forward, order, batches).result()

    def embed_tokens(self, tokens: dict[str, np.ndarray], kind: str) -> np.ndarray:
        """Rows tokenized by `TeacherTokenizer` (one array of token values per row and name)."""
        order, batches = self._batches(tokens | self.per_call[kind])
        return self.device_thread.submit(self._forward, order, batches).result()

    def _batches(self, features: dict) -> tuple[np.ndarray, list[dict]]:
        """The rows longest first, cut into padded batches (host tensors, pinned on GPU)."""
        order = np.argsort([-len(ids) for ids in features["input_ids"]], kind="stable")
        starts = range(0, len(order), self.batch_size)
        return order, [self._pad(features, order[s : s + self.batch_size]) for s in starts]

    def _forward(self, order: np.ndarray, batches: list[dict]) -> np.ndarray:
        autocast = (
            torch.autocast(device_type=self.device, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        out = []
        with torch.inference_mode(), autocast:
            for batch in batches:
                on_device = {
                    name: value.to(self.device, non_blocking=True)
                    if isinstance(value, torch.Tensor)
                    else value
                    for name, value in batch.items()
                }
                out.append(self.model(on_device)["sentence_embedding"].float())
        vectors = torch.cat(out).cpu().numpy()
        result = np.empty_like(vectors)
        result[order] = vectors
        return result

    def _pad(self, features: dict, rows: np.ndarray) -> dict:
        """Pad the chosen rows to their longest, on the tokenizer's side, in one masked copy per
        name. Hand-written: the tokenizer's own `pad` is slow Python for fast tokenizers, and
        another thread may be tokenizing with that tokenizer meanwhile."""
        tokenizer = self.model.tokenizer
        lengths = np.array([len(features["input_ids"][i]) for i in rows])
        width = padded_width(int(lengths.max()), self.model.max_seq_length, self.device == "cuda")
        filled = np.arange(width) < lengths[:, None]
        if tokenizer.padding_side == "left":
            filled = filled[:, ::-1]
        batch = {}
        for name, values in features.items():
            if not isinstance(values, list | np.ndarray):  # modality, prompt_length: per call
                batch[name] = values
                continue
            fill = tokenizer.pad_token_id if name == "input_ids" else 0
            padded = np.full((len(rows), width), fill, dtype=np.int64)
            padded[filled] = np.concatenate([values[i] for i in rows])
            tensor = torch.from_numpy(padded)
            # Pinned: the copy to the device is asynchronous and overlaps the running forward.
            batch[name] = tensor.pin_memory() if self.device == "cuda" else tensor
        return batch


UNPADDED = {"text": {"padding": False}, "common": {"return_tensors": None}}


def tokenize(model: SentenceTransformer, texts: list[str], prompt: str | None) -> dict:
    """The model's own `preprocess` (prompt, truncation, special tokens), unpadded: a list of
    values per row for each per-row name."""
    return model.preprocess(texts, prompt=prompt, processing_kwargs=UNPADDED)


def padded_width(longest: int, limit: int, on_gpu: bool) -> int:
    """On GPU, widths in steps of 8 (up to `limit`): tensor-core friendly, and fewer distinct
    shapes to warm up. Not on CPU: on short real texts (median 13 tokens) it added 13% of
    tokens."""
    return min(-(-longest // 8) * 8, max(longest, limit)) if on_gpu else longest


def local_teacher(cfg: TeacherConfig, torch_threads: int) -> LocalTeacher:
    """The teacher on this actor's GPU if it has one, else its CPUs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # on CPU the cores belong to the forward
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = str(torch_threads)
    torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
    return LocalTeacher(cfg, device)


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
