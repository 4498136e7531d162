"""The projection fitted in closed form, and the head-only phase of training: no Ray."""

import numpy as np
import pytest
import torch

from leaf_ray.config import TrainConfig
from leaf_ray.losses import leaf_loss
from leaf_ray.projection import fit_projection
from leaf_ray.student import freeze_unused, param_groups
from leaf_ray.train.loop import optimizer_step
from leaf_ray.train.schedule import head_only_steps, leaf_schedule


def orthonormal_rows(rng, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(cols, rows)))
    return q.T  # rows x cols, Q Q^T = I


def cosines(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit @ unit.T


def test_procrustes_recovers_a_rotation_into_a_wider_space_and_keeps_cosines():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    rotation = orthonormal_rows(rng, 8, 12)
    y = 0.5 * x @ rotation  # the teacher's space: wider, rotated, scaled
    weight, bias = fit_projection(x, y + rng.normal(scale=1e-3, size=y.shape), "procrustes")
    assert weight.shape == (12, 8) and not bias.any()
    assert weight.T == pytest.approx(0.5 * rotation, abs=1e-3)
    mapped = x @ weight.T
    assert cosines(mapped) == pytest.approx(cosines(x), abs=1e-9)  # W W^T = s^2 I exactly


def test_least_squares_recovers_a_linear_map_with_its_bias():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6))
    true_w, true_b = rng.normal(size=(6, 10)), rng.normal(size=10)
    weight, bias = fit_projection(x, x @ true_w + true_b, "least_squares")
    assert weight.T == pytest.approx(true_w, abs=1e-2)
    assert bias == pytest.approx(true_b, abs=1e-2)


def test_procrustes_beats_least_squares_at_keeping_the_students_neighbours():
    """On vectors a linear map fits badly, least squares bends the student's geometry (it shrinks
    directions to fit); Procrustes cannot."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    y = np.tanh(3 * x @ orthonormal_rows(rng, 8, 12))
    ls = x @ fit_projection(x, y, "least_squares")[0].T
    pr = x @ fit_projection(x, y, "procrustes")[0].T
    assert np.abs(cosines(pr) - cosines(x)).max() < 1e-9
    assert np.abs(cosines(ls) - cosines(x)).max() > 1e-3


def test_schedule_trains_the_head_alone_first_then_everything_with_a_new_warmup():
    cfg = TrainConfig(
        epochs=2, cycles=2, lr=1.0, head_lr=4.0, head_only_ratio=0.25, warmup_ratio=0.2
    )
    encoder, head = (torch.nn.Parameter(torch.zeros(1)) for _ in range(2))
    optimizer = torch.optim.SGD([{"params": [encoder], "lr": 1.0}, {"params": [head], "lr": 4.0}])
    schedule = leaf_schedule(optimizer, 40, cfg)
    assert head_only_steps(40, cfg) == 10
    rates = []
    for _ in range(40):
        rates.append(schedule.get_last_lr())
        optimizer.step()
        schedule.step()
    enc, hd = zip(*rates, strict=True)
    assert enc[:10] == (0.0,) * 10  # the encoder is frozen
    assert hd[:3] == pytest.approx([4 / 3, 8 / 3, 4.0])  # the head's own warm-up at head_lr
    assert hd[9] == pytest.approx(0.4)  # ... decaying to head_lr x final_lr_ratio
    # Then two cycles over the other 30 steps, each with its own warm-up, the head at lr too.
    assert enc[10:] == pytest.approx(hd[10:])
    assert enc[10:13] == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    assert enc[13] == enc[28] == pytest.approx(1.0)
    assert enc[24] == enc[39] == pytest.approx(0.1)
    # Every rate is a Python float: the schedule's state goes into checkpoints.
    assert all(type(r) is float for r in schedule.state_dict()["_last_lr"])


def test_a_frozen_projection_has_rate_zero_throughout():
    cfg = TrainConfig(epochs=1, cycles=1, lr=1.0, freeze_projection=True)
    encoder, head = (torch.nn.Parameter(torch.zeros(1)) for _ in range(2))
    optimizer = torch.optim.SGD([{"params": [encoder]}, {"params": [head]}], lr=1.0)
    schedule = leaf_schedule(optimizer, 10, cfg)
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr())
        optimizer.step()
        schedule.step()
    assert max(enc for enc, _ in rates) == pytest.approx(1.0)
    assert {hd for _, hd in rates} == {0.0}


def test_schedule_state_round_trips_through_torchs_safe_loader(tmp_path):
    """Cycles of 20 steps and more once made numpy rates that torch.load refused."""
    cfg = TrainConfig(epochs=3, cycles=3, head_only_ratio=0.1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3})
    schedule = leaf_schedule(optimizer, 300, cfg)
    for _ in range(57):
        optimizer.step()
        schedule.step()
    torch.save({"scheduler": schedule.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    again = leaf_schedule(optimizer, 300, cfg)
    again.load_state_dict(state["scheduler"])
    assert again.get_last_lr() == schedule.get_last_lr()


def test_the_encoder_is_unchanged_during_the_head_only_phase_and_trains_after(tiny_student):
    cfg = TrainConfig(epochs=1, cycles=1, lr=1e-3, head_only_ratio=0.5)
    freeze_unused(tiny_student)
    groups = param_groups(tiny_student, cfg.lr, cfg.projection_lr)
    encoder, head = (g["params"] for g in groups)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    schedule = leaf_schedule(optimizer, 6, cfg)
    texts = ["a small test", "another sentence here", "words", "the last text of four"]
    features = tiny_student.preprocess(texts)
    targets = torch.nn.functional.normalize(torch.randn(4, 24), dim=-1)

    def train_steps(n: int, frozen: bool) -> None:
        for _ in range(n):
            loss = leaf_loss(tiny_student(dict(features))["sentence_embedding"], targets)
            loss.backward()
            optimizer_step(optimizer, schedule, encoder + head, encoder if frozen else [], 1.0)

    start = [p.detach().clone() for p in encoder + head]
    train_steps(head_only_steps(6, cfg), frozen=True)
    assert all(torch.equal(p, q) for p, q in zip(encoder, start, strict=False))
    assert len(encoder) > len(head) > 0
    assert not any(torch.equal(p, q) for p, q in zip(head, start[len(encoder) :], strict=True))
    assert not any(p in optimizer.state for p in encoder)  # its Adam moments start later
    train_steps(3, frozen=False)
    assert not any(torch.equal(p, q) for p, q in zip(encoder, start, strict=False))
