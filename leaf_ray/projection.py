"""The student's projection fitted in closed form before training.

A pretrained student's pooled vectors already carry its geometry. A random projection makes the
first steps push large, meaningless gradients into that encoder (Kumar et al., "Fine-Tuning can
Distort Pretrained Features", 2022): fit the head first. On a sample of training texts, with X the
student's pooled vectors and Y the teacher's:

- `procrustes`: W = s U V^T from the SVD of X^T Y, the rotation that best maps X onto Y. When
  the student is narrower than the teacher, W W^T = s^2 I: the student's own cosines are kept
  exactly, so it starts as good as it was, already in the teacher's space.
- `least_squares`: ridge regression with a bias, the best linear map in squared error.

Example:
    >>> x = np.random.default_rng(0).normal(size=(100, 4))
    >>> weight, bias = fit_projection(x, x @ np.eye(4, 6), "procrustes")
    >>> weight.shape, bias.shape  # as torch.nn.Linear holds them: (out, in), (out,)
    ((6, 4), (6,))
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import ray
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense

from leaf_ray.cluster import node_amounts

Fit = Literal["procrustes", "least_squares"]
# Ridge strength, relative to the mean variance of the student's dimensions: enough to keep the
# solve stable when the sample is barely larger than the student's width, small otherwise.
RIDGE = 1e-3


def fit_projection(
    pooled: np.ndarray, targets: np.ndarray, method: Fit
) -> tuple[np.ndarray, np.ndarray]:
    """The Linear layer's weight (out x in) and bias mapping `pooled` rows onto `targets` rows."""
    x, y = pooled.astype(np.float64), targets.astype(np.float64)
    if method == "procrustes":
        u, s, vt = np.linalg.svd(x.T @ y, full_matrices=False)
        scale = s.sum() / np.square(x).sum()  # the best scalar: outputs of the teachers' norm
        return (scale * u @ vt).T, np.zeros(y.shape[1])
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc = x - x_mean
    gram = xc.T @ xc
    ridge = RIDGE * np.trace(gram) / gram.shape[0]
    w = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), xc.T @ (y - y_mean))
    return w.T, y_mean - x_mean @ w


def pooled_vectors(encoder: SentenceTransformer, texts: list[str], batch_size: int) -> np.ndarray:
    """The encoder's pooled vectors (the projection's input), computed in a Ray task on one node
    (a GPU's when the cluster has one): the driver may hold neither."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    cpus = max(1, int(max(node_amounts("CPU"), default=1)))  # the largest node's
    task = ray.remote(_pooled).options(num_cpus=cpus, num_gpus=gpus)
    return ray.get(task.remote(encoder, texts, batch_size, cpus))


def _pooled(
    encoder: SentenceTransformer, texts: list[str], batch_size: int, threads: int
) -> np.ndarray:
    torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1
    encoder.to("cuda" if torch.cuda.is_available() else "cpu")
    return encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True)


def fit_student_projection(
    student: SentenceTransformer,
    texts: list[str],
    targets: np.ndarray,
    method: Fit,
    batch_size: int,
) -> None:
    """Write the projection fitted on `texts` and their teacher vectors into `student`'s Dense
    layer, in place."""
    encoder = SentenceTransformer(modules=[student[0], student[1]], device="cpu")
    weight, bias = fit_projection(pooled_vectors(encoder, texts, batch_size), targets, method)
    dense = next(m for m in student if isinstance(m, Dense))
    with torch.no_grad():
        dense.linear.weight.copy_(torch.from_numpy(weight))
        dense.linear.bias.copy_(torch.from_numpy(bias))
