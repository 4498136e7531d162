"""What a checkpoint carries besides the student: step, optimiser, schedule, and the history
rows logged since the checkpoint before (the run's history is the sum of them: `History`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch

from leaf_ray.run import METRICS_JSONL, VALIDATION_JSONL
from leaf_ray.storage import Location


@dataclass
class TrainState:
    """Where training stands, saved in every checkpoint beside the optimiser and the schedule.
    Plain Python values only, so a checkpoint loads with torch's safe loader."""

    step: int = 0
    epoch: int = 0
    micro_batches_done: int = 0  # in `epoch`: a mid-epoch checkpoint resumes inside it
    resumes: int = 0  # restarts from a checkpoint so far (failures, reruns)
    # Since the checkpoint before: a checkpoint's size does not grow with the run's length.
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
        state.history, state.validations = [], []  # kept in the run's history already
        state.resumes += 1
        if state.micro_batches_done == micro_per_epoch:  # saved at the epoch's end
            state.epoch, state.micro_batches_done = state.epoch + 1, 0
        return state

    def to_checkpoint(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> dict:
        """The checkpoint's state; the history rows it carries start afresh after it."""
        saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        saved |= asdict(self)
        self.history, self.validations = [], []
        return saved


@dataclass(frozen=True)
class History:
    """The run's history, a file per checkpoint of the rows logged since the one before, where
    Ray Train's checkpoints are (which it deletes past `keep_checkpoints`). A file is named by
    its checkpoint's step: a run resumed from an earlier checkpoint writes the same files again."""

    folder: Location

    def add(self, saved: dict) -> None:
        step = saved["step"]
        for name, rows in (
            (METRICS_JSONL, saved["history"]),
            (VALIDATION_JSONL, saved["validations"]),
        ):
            lines = "".join(json.dumps(row) + "\n" for row in rows)
            (self.folder / f"{step:010d}-{name}").write(lines)

    def read(self, name: str) -> list[dict]:
        """Every row of `name` (METRICS_JSONL or VALIDATION_JSONL), in step order."""
        files = self.folder.files(f"-{name}")
        return [json.loads(line) for f in files for line in f.read_text().splitlines()]


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
