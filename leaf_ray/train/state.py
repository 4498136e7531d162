"""What a checkpoint carries besides the student: step, optimiser, schedule, history."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass
class TrainState:
    """Where training stands, saved in every checkpoint beside the optimiser and the schedule.
    Plain Python values only, so a checkpoint loads with torch's safe loader."""

    step: int = 0
    epoch: int = 0
    micro_batches_done: int = 0  # in `epoch`: a mid-epoch checkpoint resumes inside it
    resumes: int = 0  # restarts from a checkpoint so far (failures, reruns)
    history: list[dict] = field(default_factory=list)  # a row per logged step
    validations: list[dict] = field(default_factory=list)  # a row per checkpoint (and step 0)

    @classmethod
    def restore(
        cls,
        saved: dict,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        micro_per_epoch: int,
    ) -> TrainState:
        """Continue the schedule and the data where the checkpoint left them."""
        load_optimizer(optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = cls(**{f.name: saved[f.name] for f in fields(cls)})
        state.resumes += 1
        if state.micro_batches_done == micro_per_epoch:  # saved at the epoch's end
            state.epoch, state.micro_batches_done = state.epoch + 1, 0
        return state

    def to_checkpoint(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> dict:
        saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        return saved | asdict(self)


# The optimiser options that say how it steps, not what it has learnt.
HOW_IT_STEPS = ("fused", "foreach", "capturable")


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The checkpoint's optimiser state, stepped the way `optimizer` was built to step.

    torch's `load_state_dict` takes the checkpoint's options too, so a run checkpointed with the
    eager step and resumed where the step is fused (a CPU cluster's run rerun on GPUs) would keep
    an unfused AdamW that the fast step cannot drive; the checkpoint's own options also decide
    where its step counts are cast."""
    groups = [
        theirs | {key: mine[key] for key in HOW_IT_STEPS if key in mine}
        for mine, theirs in zip(optimizer.param_groups, saved["param_groups"], strict=True)
    ]
    optimizer.load_state_dict(saved | {"param_groups": groups})
