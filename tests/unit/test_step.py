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


def test_the_fast_step_resumes_exactly(tiny_student, tmp_path):
    """Three steps, a checkpoint of weights, optimiser and schedule, a new process's objects
    loaded from it, two more steps: the weights of five uninterrupted steps, bit for bit."""
    resumed_student = copy.deepcopy(tiny_student)
    torch.manual_seed(2)
    whole = Run(tiny_student, fast=True)
    for _ in range(5):
        whole.step()

    torch.manual_seed(2)
    first = Run(resumed_student, fast=True)
    for _ in range(3):
        first.step()
    state = {
        "model": first.student.state_dict(),
        "optimizer": first.optimizer.state_dict(),
        "scheduler": first.schedule.state_dict(),
        "targets": first.targets,
    }
    torch.save(state, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed_student.load_state_dict(saved["model"])
    again = Run(resumed_student, fast=True)
    again.optimizer.load_state_dict(saved["optimizer"])
    again.schedule.load_state_dict(saved["scheduler"])
    again.targets = saved["targets"]
    for _ in range(2):
        again.step()
    for a, b in zip(whole.weights(), again.weights(), strict=True):
        assert torch.equal(a, b)


def test_without_a_fused_kernel_the_step_is_eager(tiny_student):
    """A device without a fused AdamW (meta here): a warning, and the eager step."""
    groups = param_groups(tiny_student.to("meta"), CFG.lr, CFG.projection_lr)
    with pytest.warns(UserWarning, match="the eager step instead"):
        optimizer, fused = _adamw(groups, CFG.weight_decay, fused=True)
    assert not fused and not optimizer.defaults["fused"]
