"""The optimiser step, eager and fast (fused AdamW, no host sync): the same training, a
non-finite step kept off the weights either way, and an exact resume. No Ray."""

import copy

import pytest
import torch

from leaf_ray.config import TrainConfig
from leaf_ray.losses import leaf_loss
from leaf_ray.student import freeze_unused, param_groups
from leaf_ray.train.loop import NonFiniteGradient, _adamw, optimizer_step
from leaf_ray.train.schedule import leaf_schedule
from leaf_ray.train.state import TrainState

CFG = TrainConfig(epochs=1, cycles=1, lr=1e-3, warmup_ratio=0.2)
TEXTS = ["a small test", "another sentence here", "words", "the last text of four"]


class Run:
    """A student, its optimiser (fused for `fast`) and schedule, stepping on four texts."""

    def __init__(self, student, fast: bool, steps: int = 8):
        self.student, self.fast = student, fast
        freeze_unused(student)
        groups = param_groups(student, CFG.lr, CFG.projection_lr)
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer, fused = _adamw(groups, CFG.weight_decay, fused=fast)
        assert fused == fast
        self.schedule = leaf_schedule(self.optimizer, steps, CFG)
        self.features = student.preprocess(TEXTS)
        self.targets = torch.nn.functional.normalize(torch.randn(4, 24), dim=-1)

    def step(self, poison: bool = False) -> tuple[float, torch.Tensor]:
        embedded = self.student(dict(self.features))["sentence_embedding"]
        loss = leaf_loss(embedded, self.targets)
        loss.backward()
        if poison:  # one gradient entry not finite, as after an overflow
            self.params[0].grad.view(-1)[0] = float("nan")
        _, _, finite = optimizer_step(
            self.optimizer, self.schedule, self.params, [], CFG.max_grad_norm, on_device=self.fast
        )
        return loss.item(), finite

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


def test_the_fast_step_trains_as_the_eager_step(tiny_student):
    torch.manual_seed(1)
    eager = Run(tiny_student, fast=False)
    torch.manual_seed(1)
    fast = Run(copy.deepcopy(tiny_student), fast=True)
    losses = [(eager.step()[0], fast.step()[0]) for _ in range(6)]
    assert losses[-1][0] < losses[0][0]  # it trains
    for a, b in losses:
        assert b == pytest.approx(a, rel=1e-5)
    for a, b in zip(eager.weights(), fast.weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_a_non_finite_step_never_reaches_the_weights(tiny_student, fast):
    """Eager: raised before the optimiser moves. Fast: the fused step is skipped on the device,
    its Adam step count too, and the host learns of it later from `finite`."""
    run = Run(tiny_student, fast=fast)
    run.step()
    before, steps = run.weights(), run.optimizer.state[run.params[0]]["step"].item()
    if fast:
        _, finite = run.step(poison=True)
        assert not finite
    else:
        with pytest.raises(NonFiniteGradient):
            run.step(poison=True)
    for a, b in zip(before, run.weights(), strict=True):
        assert torch.equal(a, b)
    assert run.optimizer.state[run.params[0]]["step"].item() == steps
    _, finite = run.step()  # and training goes on from the same weights
    assert finite and not all(torch.equal(a, b) for a, b in zip(before, run.weights(), strict=True))


def checkpointed_and_resumed(student, tmp_path, steps_before: int, fast: bool, fast_after: bool):
    """`steps_before` steps, a checkpoint of weights, optimiser and schedule, and a new
    process's Run (its step `fast_after`) resumed from it as a training worker resumes."""
    resumed_student = copy.deepcopy(student)  # the new process's copy, loaded below
    first = Run(student, fast=fast)
    for _ in range(steps_before):
        first.step()
    state = TrainState(step=steps_before).to_checkpoint(first.optimizer, first.schedule)
    torch.save(state | {"model": first.student.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)
    resumed_student.load_state_dict(saved["model"])
    again = Run(resumed_student, fast=fast_after)
    again.targets = first.targets
    assert TrainState.restore(saved, again.optimizer, again.schedule, 8).step == steps_before
    return again


def whole_and_resumed(student, tmp_path, seed: int, fast: bool, fast_after: bool):
    """Five uninterrupted steps, and from the same start three steps, a checkpoint and the
    resumed Run (its step `fast_after`), yet to take its last two."""
    copied = copy.deepcopy(student)
    torch.manual_seed(seed)
    whole = Run(student, fast=fast)
    for _ in range(5):
        whole.step()
    torch.manual_seed(seed)
    return whole, checkpointed_and_resumed(copied, tmp_path, 3, fast=fast, fast_after=fast_after)


def test_the_fast_step_resumes_exactly(tiny_student, tmp_path):
    """Three steps, a checkpoint, two more steps in a new process's objects: the weights of
    five uninterrupted steps, bit for bit."""
    whole, again = whole_and_resumed(tiny_student, tmp_path, 2, fast=True, fast_after=True)
    for _ in range(2):
        again.step()
    for a, b in zip(whole.weights(), again.weights(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fast", [False, True])
def test_a_checkpoint_resumes_under_the_other_step(tiny_student, tmp_path, fast):
    """A run checkpointed under one step and resumed under the other (a CPU cluster's run
    rerun on GPUs, where the step is fused, or back): the resumed optimiser steps as its own
    device asks, not as the checkpoint's did, and trains as the uninterrupted run does."""
    whole, again = whole_and_resumed(tiny_student, tmp_path, 3, fast=fast, fast_after=not fast)
    assert bool(again.optimizer.param_groups[0]["fused"]) is not fast
    for _ in range(2):
        _, finite = again.step()
        assert finite
    for a, b in zip(whole.weights(), again.weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_a_fused_kernel_the_step_is_eager(tiny_student):
    """A device without a fused AdamW (meta here): a warning, and the eager step."""
    groups = param_groups(tiny_student.to("meta"), CFG.lr, CFG.projection_lr)
    with pytest.warns(UserWarning, match="the eager step instead"):
        optimizer, fused = _adamw(groups, CFG.weight_decay, fused=True)
    assert not fused and not optimizer.defaults["fused"]
