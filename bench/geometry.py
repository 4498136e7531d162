"""What training does to a student's geometry, on the dev sets' own texts.

For the first 300 queries and 300 documents of each BEIR folder, and 600 training texts past
the first `--skip` (never trained on), each student's mean cosine to the teacher (both run here,
max length 256), the correlation of its pairwise cosines with the teacher's (global structure),
and its mean pairwise cosine (how much its vectors share one direction; the teacher's beside).

    python bench/geometry.py --teacher TEACHER_FOLDER --texts TEXTS.jsonl.gz \\
        --eval DEBIAN_DESC WORDNET -- STUDENT_FOLDER [STUDENT_FOLDER ...]

With `--retrieval BEIR_FOLDER`, instead: nDCG@10 (exact cosine search) of each student, of its
encoder and pooling alone (no projection), and of its outputs with their mean moved onto the
teacher's, or mapped by a ridge fit (with bias) onto the teacher's, both fitted on the first
2,000 training texts; symmetric, and asymmetric against the teacher's documents.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--texts", required=True, help="the training texts (JSONL.gz)")
    parser.add_argument("--skip", type=int, default=20000, help="training texts trained on")
    parser.add_argument("--eval", nargs="+", required=True, help="BEIR-layout folders")
    parser.add_argument("--retrieval", help="a BEIR folder: score repairs of each student")
    parser.add_argument("students", nargs="+")
    args = parser.parse_args()
    if args.retrieval:
        retrieval(args)
        return
    sets = {}
    for folder in map(Path, args.eval):
        sets[f"{folder.name} queries"] = first_texts(folder / "queries.jsonl", 300)
        sets[f"{folder.name} corpus"] = first_texts(folder / "corpus.jsonl", 300)
    with gzip.open(args.texts, "rt") as f:
        rows = itertools.islice(f, args.skip, args.skip + 600)
        sets["held-out training texts"] = [json.loads(line)["text"] for line in rows]
    teacher = load(args.teacher)
    students = {folder: load(folder) for folder in args.students}
    for name, texts in sets.items():
        t = teacher.encode(texts, normalize_embeddings=True, batch_size=32)
        upper = np.triu_indices(len(texts), 1)
        cells = [name, f"teacher mean pair {(t @ t.T)[upper].mean():.3f}"]
        for folder, model in students.items():
            s = model.encode(texts, normalize_embeddings=True, batch_size=32)
            pairs = (s @ s.T)[upper]
            r = np.corrcoef(pairs, (t @ t.T)[upper])[0, 1]
            cells.append(
                f"{Path(folder).name}: cosine {(s * t).sum(1).mean():.3f}, pair r {r:.3f}, "
                f"mean pair {pairs.mean():.3f}"
            )
        print(" | ".join(cells), flush=True)


def retrieval(args: argparse.Namespace) -> None:
    folder = Path(args.retrieval)
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query, doc, score = line.split("\t")
        qrels.setdefault(query, {})[doc] = int(score)
    queries = [r for r in map(json.loads, (folder / "queries.jsonl").open()) if r["_id"] in qrels]
    corpus = list(map(json.loads, (folder / "corpus.jsonl").open()))
    doc_ids = [d["_id"] for d in corpus]
    q_texts = [q["text"] for q in queries]
    d_texts = [f"{d['title']}. {d['text']}" if d.get("title") else d["text"] for d in corpus]
    with gzip.open(args.texts, "rt") as f:
        train = [json.loads(line)["text"] for line in itertools.islice(f, 2000)]

    def ndcg(q: np.ndarray, d: np.ndarray) -> float:
        top = np.argsort(-(q @ d.T), axis=1)[:, :10]
        scores = []
        for i, query in enumerate(queries):
            rel = qrels[query["_id"]]
            dcg = sum(rel.get(doc_ids[j], 0) / np.log2(r + 2) for r, j in enumerate(top[i]))
            gains = sorted(rel.values(), reverse=True)[:10]
            scores.append(dcg / sum(g / np.log2(r + 2) for r, g in enumerate(gains)))
        return round(float(np.mean(scores)), 4)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    teacher = load(args.teacher)
    tq, td, tt = (
        teacher.encode(x, normalize_embeddings=True, batch_size=64)
        for x in (q_texts, d_texts, train)
    )
    print(f"teacher sym {ndcg(tq, td)}", flush=True)
    for folder in args.students:
        model = load(folder)
        sq, sd, st = (
            model.encode(x, normalize_embeddings=True, batch_size=64)
            for x in (q_texts, d_texts, train)
        )
        encoder = SentenceTransformer(modules=[model[0], model[1]], device="cpu")
        pq_, pd_ = (unit(encoder.encode(x, batch_size=64)) for x in (q_texts, d_texts))
        shift = tt.mean(0) - st.mean(0)
        mq, md = unit(sq + shift), unit(sd + shift)
        a, b = st - st.mean(0), tt - tt.mean(0)
        w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ b)
        rq, rd = (unit((x - st.mean(0)) @ w + tt.mean(0)) for x in (sq, sd))
        print(
            f"{Path(folder).name}: sym {ndcg(sq, sd)} asym {ndcg(sq, td)} | encoder alone sym "
            f"{ndcg(pq_, pd_)} | mean moved sym {ndcg(mq, md)} asym {ndcg(mq, td)} | ridge sym "
            f"{ndcg(rq, rd)} asym {ndcg(rq, td)}",
            flush=True,
        )


def first_texts(path: Path, n: int) -> list[str]:
    with path.open() as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


def load(folder: str) -> SentenceTransformer:
    model = SentenceTransformer(folder, device="cpu")
    model.max_seq_length = 256
    return model


if __name__ == "__main__":
    main()
