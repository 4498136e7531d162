"""Training objectives for a pretrained student, compared on one process, outside the pipeline.

docs/quality.md found that LEAF's squared-L2 loss, trained on 20,000 texts, lowers a pretrained
student's retrieval scores. This script trains the same student (its projection fitted and
frozen, as `configs/mpnet.yaml` does) with other objectives and batchings, and scores it on BEIR
folders in symmetric mode (student against student) and asymmetric mode (student queries against
the teacher's documents), with exact cosine search and nDCG@10 as mteb computes it.

    python bench/objective.py --init RUN/student_init --vectors V.parquet --teacher TEACHER \\
        --eval DEBIAN_DESC WORDNET --loss l2+kl --batching neighbours [--lam 1 --tau 0.05]

Objectives (summed when joined by +):
- l2: LEAF's, the squared L2 distance between the student's vector and the teacher's.
- kl: the teacher's similarity distribution over the batch, softmax(t_i . t_j / tau), as the
  target of the student's cross similarities softmax(s_i . t_j / tau): each text's neighbours
  ranked as the teacher ranks them.
- klself: the same target for the student's own similarities softmax(s_i . s_j / tau), each
  text's own vector left out on both sides: the student ranks its own vectors as the teacher
  ranks its, which is what symmetric search (student against student) uses.
Batchings: `random` (length-bucketed, as the pipeline trains) or `neighbours`: each batch a text
and its nearest unassigned texts by the teacher's vectors (no labels: only the teacher's own
vectors choose them), so the kl term ranks close texts, where retrieval is decided.

Hand-written training loop: the point is the objective alone, on one process, with nothing else
changed; the pipeline's DDP training is in leaf_ray/train/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from quality import merge  # bench/quality.py: the same results file
from sentence_transformers import SentenceTransformer

from leaf_ray.losses import leaf_loss
from leaf_ray.train.batching import length_sorted_batches, neighbour_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="the student as training starts")
    parser.add_argument("--vectors", required=True, help="Parquet: text, embedding (teacher)")
    parser.add_argument("--teacher", required=True, help="the teacher, for its document vectors")
    parser.add_argument("--eval", nargs="+", required=True, help="BEIR-layout folders")
    parser.add_argument("--loss", default="l2", help="l2, kl, klself, or a sum: kl+klself")
    parser.add_argument("--batching", default="random", choices=["random", "neighbours"])
    parser.add_argument("--lam", type=float, default=1.0, help="the kl term's weight")
    parser.add_argument("--tau", type=float, default=0.05, help="the kl term's temperature")
    parser.add_argument("--window", type=int, help="neighbours within windows of N texts")
    parser.add_argument("--limit", type=int, default=20000, help="first N texts")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/objective", help="the teacher's document vectors")
    parser.add_argument("--out", help="save the trained student here")
    parser.add_argument("--record", help="merge the scores into bench/results as this recipe")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    table = pq.read_table(args.vectors, columns=["text", "embedding"]).slice(0, args.limit)
    texts = table.column("text").to_pylist()
    targets = torch.tensor(np.array(table.column("embedding").to_pylist(), dtype=np.float32))
    student = SentenceTransformer(args.init, device="cpu")
    if args.epochs:
        train(student, texts, targets, args)
    if args.out:
        student.save(args.out)
    scores = {Path(folder).name: score(student, Path(folder), args) for folder in args.eval}
    print(json.dumps({"args": vars(args), **scores, "seconds": round(time.time() - start)}))
    if args.record:
        common = {"recipe": args.record, "seed": args.seed, "texts": args.limit}
        merge(
            [
                {**common, "epochs": args.epochs, "task": task, "mode": mode, "ndcg_at_10": value}
                for task, both in scores.items()
                for mode, value in (("student", both["sym"]), ("asymmetric", both["asym"]))
            ]
        )


def train(student: SentenceTransformer, texts: list[str], targets: torch.Tensor, args) -> None:
    student.max_seq_length = 128
    for module in student:  # the fitted projection stays as it is, as in configs/mpnet.yaml
        if type(module).__name__ == "Dense":
            module.requires_grad_(False)
    pooler = getattr(student[0].auto_model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
    plans = [batches(texts, targets, args, epoch) for epoch in range(args.epochs)]
    steps = sum(len(plan) for plan in plans)
    warmup = max(1, steps // 10)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01
    )

    def rate(step: int) -> float:  # linear warm-up, then a cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    student.train()
    for step, rows in enumerate(row for plan in plans for row in plan):
        predicted = student(student.preprocess([texts[i] for i in rows]))["sentence_embedding"]
        value = loss(predicted, targets[rows], args)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps} loss {value.item():.4f}", flush=True)
    student.eval()


def loss(student: torch.Tensor, teacher: torch.Tensor, args) -> torch.Tensor:
    terms = args.loss.split("+")
    total = torch.zeros(())
    if "l2" in terms:
        total = total + leaf_loss(student, teacher, "l2")
    if "kl" in terms:
        weight = args.lam if len(terms) > 1 else 1.0
        total = total + weight * leaf_loss(student, teacher, "kl", args.tau)
    if "klself" in terms:  # the student's own similarities, each text's own left out
        others = ~torch.eye(len(student), dtype=torch.bool)
        rows = (len(student), len(student) - 1)
        target = F.softmax((teacher @ teacher.T)[others].view(rows) / args.tau, dim=-1)
        predicted = F.log_softmax((student @ student.T)[others].view(rows) / args.tau, dim=-1)
        total = total + F.kl_div(predicted, target, reduction="batchmean")
    return total


def batches(texts: list[str], targets: torch.Tensor, args, epoch: int) -> list[np.ndarray]:
    """The pipeline's batchings (leaf_ray.train.batching) over shuffled windows: 16 batches'
    texts for `random`, `--window` texts (default: all) for `neighbours`."""
    rng = np.random.default_rng(args.seed * 100 + epoch)
    order, out, all_texts = rng.permutation(len(texts)), [], np.array(texts)
    window = args.batch * 16 if args.batching == "random" else args.window or len(texts)
    for first in range(0, len(order), window):
        rows = order[first : first + window]
        if args.batching == "random":
            out += [rows[b] for b in length_sorted_batches(all_texts[rows], args.batch)]
        else:
            out += [rows[b] for b in neighbour_batches(targets[rows].numpy(), args.batch)]
    rng.shuffle(out)
    return out


def score(student: SentenceTransformer, folder: Path, args) -> dict[str, float]:
    """nDCG@10 in symmetric and asymmetric mode, max length 256, exact cosine search."""
    queries = dict(_jsonl(folder / "queries.jsonl"))
    corpus = dict(_jsonl(folder / "corpus.jsonl"))
    qrels: dict[str, dict[str, int]] = {}
    for path in (folder / "qrels").glob("*.tsv"):
        for row in csv.DictReader(path.open(), delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    qids, dids = list(queries), list(corpus)
    student.max_seq_length = 256
    query_vectors = student.encode([queries[q] for q in qids], batch_size=64)
    document_vectors = student.encode([corpus[d] for d in dids], batch_size=64)
    teacher_documents = _teacher_documents(folder, [corpus[d] for d in dids], args)
    return {
        "sym": round(_ndcg(query_vectors, document_vectors, qids, dids, qrels), 4),
        "asym": round(_ndcg(query_vectors, teacher_documents, qids, dids, qrels), 4),
    }


def _teacher_documents(folder: Path, documents: list[str], args) -> np.ndarray:
    cached = Path(args.cache) / f"{folder.name}-teacher-documents.npy"
    if not cached.is_file():
        teacher = SentenceTransformer(args.teacher, device="cpu")
        teacher.max_seq_length = 256
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, teacher.encode(documents, batch_size=64))
    return np.load(cached)


def _jsonl(path: Path):
    for line in path.open():
        row = json.loads(line)
        yield row["_id"], f"{row['title']} {row['text']}" if row.get("title") else row["text"]


def _ndcg(queries, documents, qids, dids, qrels) -> float:
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    top = np.argsort(-(unit(queries) @ unit(documents).T), axis=1)[:, :10]
    total = counted = 0
    for i, qid in enumerate(qids):
        relevant = qrels.get(qid)
        if not relevant:
            continue
        dcg = sum(relevant.get(dids[j], 0) / np.log2(r + 2) for r, j in enumerate(top[i]))
        ideal = sorted(relevant.values(), reverse=True)[:10]
        total += dcg / sum(g / np.log2(r + 2) for r, g in enumerate(ideal))
        counted += 1
    return total / counted


if __name__ == "__main__":
    main()
