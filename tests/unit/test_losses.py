import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from leaf_ray.losses import gather_candidates, leaf_loss


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), dim=-1)


def test_leaf_loss_is_mean_squared_l2():
    s, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert leaf_loss(s, t).item() == pytest.approx((2.0 + 0.0) / 2)
    vectors = unit(4, 8)
    assert leaf_loss(vectors, vectors).item() == 0.0


def test_cosine_loss_ignores_the_students_norm():
    s, t = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert leaf_loss(s, t, "cosine").item() == pytest.approx((0.0 + 1.0) / 2)
    assert leaf_loss(s, t, "l2").item() == pytest.approx((1.0 + 10.0) / 2)


def test_kl_is_the_divergence_of_the_teachers_ranking_of_the_batch():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # the first text ranks the batch the wrong way
    p, q = F.softmax(t @ t.T / 0.5, dim=-1), F.softmax(s @ t.T / 0.5, dim=-1)
    expected = (p * (p / q).log()).sum(dim=-1).mean()
    assert leaf_loss(s, t, "kl", temperature=0.5).item() == pytest.approx(expected.item())
    assert leaf_loss(t, t, "kl").item() == pytest.approx(0.0, abs=1e-6)
    assert leaf_loss(s, t, "kl", temperature=0.5).item() > 0.1


def test_kl_sees_only_the_similarities_to_the_candidates():
    """A student vector moved orthogonally to every teacher vector of the batch ranks the batch
    the same: kl is unchanged where l2 is not, which is what leaves a pretrained student's own
    geometry free."""
    teacher = torch.zeros(4, 8)
    teacher[:, :4] = unit(4, 4)
    student = unit(4, 8)
    moved = student.clone()
    moved[:, 4:] += 0.5
    assert leaf_loss(moved, teacher, "kl").item() == pytest.approx(
        leaf_loss(student, teacher, "kl").item(), rel=1e-5
    )
    assert leaf_loss(moved, teacher).item() != pytest.approx(leaf_loss(student, teacher).item())


def _worker_loss(rank: int, world: int, port: int, student, teacher, out) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    rows = slice(rank * len(teacher) // world, (rank + 1) * len(teacher) // world)
    candidates = gather_candidates(teacher[rows], world)
    out[rank] = leaf_loss(student[rows], teacher[rows], "kl", candidates=candidates)
    dist.destroy_process_group()


def test_kl_over_workers_is_the_whole_batchs_kl():
    """Two DDP workers, each with half the batch, gather the teacher vectors: the mean of their
    losses (what DDP's gradient averaging trains) is the loss of the whole batch on one worker."""
    student, teacher = unit(8, 16), unit(8, 16).roll(1, dims=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = torch.zeros(2).share_memory_()
    mp.spawn(_worker_loss, args=(2, port, student, teacher, out), nprocs=2)
    whole = leaf_loss(student, teacher, "kl")
    assert out.mean().item() == pytest.approx(whole.item(), rel=1e-5)
    assert leaf_loss(student[:4], teacher[:4], "kl").item() != pytest.approx(whole.item())
