"""LEAF's learning-rate schedule: linear warm-up and decay cycles, the projection's own phase."""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import torch

from leaf_ray.config import TrainConfig


def leaf_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LEAF's schedule for `param_groups`' (encoder, projection) groups: `cycles` equal cycles,
    each a linear warm-up then a linear decay to `final_lr_ratio` of the peak. With a head-only
    phase, its steps are one such cycle for the projection at head_lr, the encoder's rate 0; the
    cycles then share the other steps, the projection at the encoder's rate (0 when it is
    frozen). Hand-written:
    transformers restarts only cosine schedules and has no per-group phases."""
    head_steps = head_only_steps(total_steps, cfg)
    head_phase = _cycles(head_steps, 1, cfg)
    full_phase = _cycles(total_steps - head_steps, cfg.cycles, cfg)
    head_after = cfg.lr / cfg.projection_lr if head_steps else 1.0
    if cfg.freeze_projection:
        head_after = 0.0

    def encoder(step: int) -> float:
        return 0.0 if step < head_steps else full_phase(step - head_steps)

    def head(step: int) -> float:
        return head_phase(step) if step < head_steps else head_after * full_phase(step - head_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [encoder, head])


def head_only_steps(total_steps: int, cfg: TrainConfig) -> int:
    return round(cfg.head_only_ratio * total_steps)


def _cycles(steps: int, cycles: int, cfg: TrainConfig) -> Callable[[int], float]:
    """step -> factor of the peak rate over `steps` steps in `cycles` cycles. Python numbers
    only: the factors go into checkpoints, which torch's safe loader reads."""
    bounds = np.linspace(0, steps, cycles + 1).round().astype(int).tolist()

    def factor(step: int) -> float:
        cycle = min(bisect.bisect_right(bounds, step) - 1, cycles - 1)
        length = max(1, bounds[cycle + 1] - bounds[cycle])
        into = step - bounds[cycle]
        warmup = int(cfg.warmup_ratio * length)
        if into < warmup:
            return (into + 1) / (warmup + 1)
        decayed = (into - warmup) / max(1, length - warmup - 1)  # 1 at the cycle's last step
        return 1 - (1 - cfg.final_lr_ratio) * min(1.0, decayed)

    return factor
