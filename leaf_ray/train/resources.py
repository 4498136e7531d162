"""What the trainers hold: CPUs and GPUs per worker, from the config and the cluster."""

from __future__ import annotations

import ray

from leaf_ray.config import LeafConfig


def trainer_resources(cfg: LeafConfig) -> dict[str, float]:
    """What the Ray Train workers hold, all of them together."""
    gpus = gpus_per_trainer(cfg, ray.cluster_resources().get("GPU", 0))
    workers = cfg.train.num_workers
    return {"CPU": workers * cfg.train.cpus_per_worker, "GPU": workers * gpus}


def gpus_per_trainer(cfg: LeafConfig, cluster_gpus: float) -> float:
    """A GPU each when the cluster has GPUs (or use_gpu). Streaming with a local teacher on as
    many GPUs as trainers (one GPU, say), half of each: the teacher's actors take the other
    halves and the two stages take turns on every GPU (`leaf-ray plan` models the one-GPU
    case), rather than the teacher falling back to the CPUs. One trainer per GPU still: NCCL
    takes no two."""
    tcfg = cfg.train
    use_gpu = tcfg.use_gpu if tcfg.use_gpu is not None else cluster_gpus > 0
    if not use_gpu:
        return 0.0
    sharing = (
        tcfg.data_mode == "streaming"
        and cfg.teacher.backend == "sentence_transformers"
        and tcfg.num_workers == cluster_gpus
    )
    return 0.5 if sharing else 1.0
