"""How close students are to the teacher on held-out texts: cosine, and neighbourhoods.

For the texts a run holds out for validation (the first `--held` by text hash, as training
chooses them), each student's mean cosine to the teacher's vector, and the share of the
teacher's 10 nearest neighbours (among those texts) that the student also ranks in its 10.

    python bench/neighbours.py --vectors VECTORS.parquet STUDENT_FOLDER [STUDENT_FOLDER ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer

from leaf_ray.hashing import text_hashes

K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", required=True, help="the teacher's vectors (Parquet)")
    parser.add_argument("--held", type=int, default=512, help="held-out texts (train's default)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("students", nargs="+")
    args = parser.parse_args()
    table = pq.read_table(args.vectors, columns=["kind", "text", "embedding"])
    kinds, texts = table["kind"].to_pylist(), table["text"].to_pylist()
    hashes = text_hashes(kinds, texts)
    held = np.argsort(hashes)[: args.held]
    teacher = unit(np.stack(table["embedding"].to_numpy(zero_copy_only=False)[held]))
    held_texts = [texts[i] for i in held]
    for folder in args.students:
        model = SentenceTransformer(folder, device="cpu")
        model.max_seq_length = args.max_seq_length
        student = unit(model.encode(held_texts, batch_size=64))
        cosine = float((student * teacher).sum(axis=1).mean())
        overlap = neighbour_overlap(student, teacher)
        print(f"{folder}: cosine {cosine:.4f}, teacher's {K} nearest found {overlap:.1%}")


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def neighbour_overlap(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean share of each text's K nearest neighbours (itself excluded) that both spaces share."""

    def nearest(x: np.ndarray) -> np.ndarray:
        scores = x @ x.T
        np.fill_diagonal(scores, -np.inf)
        return np.argsort(-scores, axis=1)[:, :K]

    pairs = zip(nearest(student), nearest(teacher), strict=True)
    return float(np.mean([len(set(s) & set(t)) / K for s, t in pairs]))


if __name__ == "__main__":
    main()
