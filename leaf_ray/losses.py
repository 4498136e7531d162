"""The training objectives: how far a batch of student vectors is from the teacher's.

    >>> loss = leaf_loss(student_vectors, teacher_vectors, "kl", temperature=0.05)

- `l2` (LEAF's): the mean squared L2 distance between each text's student and teacher vector.
- `cosine`: the mean cosine distance, which ignores the student's norm.
- `kl`: each text's similarities to the batch's teacher vectors, as a distribution (softmax at a
  temperature), made to match the teacher's own: the student learns how the teacher *ranks* the
  batch's texts, not where its vectors lie. A pretrained student keeps its geometry under it,
  where l2 distorts it (docs/quality.md). Every text in the batch, across DDP workers, is a
  candidate: the workers' teacher vectors are gathered (they carry no gradient, so this is cheap).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from leaf_ray.config import Loss


def leaf_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: Loss = "l2",
    temperature: float = 0.05,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's mean loss of `kind`. For `kl`, `candidates` are the teacher vectors each text
    ranks (default: `teacher`, the batch itself); `teacher` must be among them."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "kl":
        candidates = teacher if candidates is None else candidates
        return similarity_kl(student, teacher, candidates, temperature)
    return (student - teacher).pow(2).sum(dim=-1).mean()


def similarity_kl(
    student: torch.Tensor, teacher: torch.Tensor, candidates: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) between softmax(t_i . c_j / T) and softmax(s_i . c_j / T) over the
    candidates c_j, averaged over the batch's texts i."""
    target = F.softmax(teacher @ candidates.T / temperature, dim=-1)
    predicted = F.log_softmax(student @ candidates.T / temperature, dim=-1)
    return F.kl_div(predicted, target, reduction="batchmean")


def gather_candidates(teacher: torch.Tensor, world: int) -> torch.Tensor:
    """Every worker's teacher vectors of this micro-batch, in rank order. Workers' micro-batches
    are the same size: each holds an equal split of the rows and cuts it the same way."""
    if world == 1:
        return teacher
    gathered = teacher.new_empty((world * teacher.shape[0], teacher.shape[1]))
    dist.all_gather_single(gathered, teacher.contiguous())
    return gathered
