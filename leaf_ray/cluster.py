"""The Ray cluster leaf-ray runs on: joining or starting it, what its nodes hold, and each task's
share of their CPUs (one formula for the teacher's actors, the trainers and the eval tasks)."""

from __future__ import annotations

import logging
import os

import ray
import ray.data

from leaf_ray.config import RayConfig
from leaf_ray.progress import on_terminal

logger = logging.getLogger(__name__)


def connect_ray(cfg: RayConfig) -> None:
    """Join the cluster at `address` or RAY_ADDRESS (`ray job submit` sets it), else one started
    here by `ray start`, else start a Ray of our own. With `num_cpus`, always one of our own.

    Ray's servers listen on every interface, so a Ray of our own relies on Ray's token
    authentication, on by default (the token in ~/.ray/auth_token): with RAY_AUTH_MODE=disabled,
    anyone who can reach this machine can run code on it, and a warning says so."""
    if not on_terminal():  # Ray Data's bars, redrawn into a log, are one line per redraw
        ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address is None and cfg.num_cpus is None:
        try:
            ray.init(address="auto")  # Ray's convention: a cluster `ray start` began here
            return
        except ConnectionError:
            pass
    if address is None:
        if os.environ.get("RAY_AUTH_MODE") == "disabled":
            logger.warning(
                "RAY_AUTH_MODE=disabled: the local Ray accepts unauthenticated connections on "
                "every interface; unset it to start Ray with token authentication"
            )
        ray.init(address="local", num_cpus=cfg.num_cpus)
    else:
        ray.init(address=address)


def node_amounts(resource: str) -> list[float]:
    """How much of `resource` each alive node has (nodes without any left out): a task or actor
    lives on one node, so the largest bounds what it can ask for."""
    return [
        n["Resources"][resource] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource)
    ]


def cpu_share(free: float, node_cpus: list[float], tasks: int, keep_per_node: float = 0) -> float:
    """CPUs each of `tasks` tasks or actors reserves: an equal share of the `free` CPUs, less
    `keep_per_node` on each node (at most half of them) left to Ray Data's own tasks, and no more
    than one node can give: a task lives on one node, and a reservation no node can meet waits
    forever."""
    largest = max(node_cpus)
    share = (free - min(keep_per_node * len(node_cpus), free / 2)) / tasks
    return min(share, largest - min(keep_per_node, largest / 2))


def torch_threads(free: float, node_cpus: list[float], tasks: int) -> int:
    """Threads each of `tasks` runs torch with: an equal share of the CPUs, at most one node's, at
    least one. It may exceed what the task reserves (`cpu_share`): the CPUs kept for Ray Data's
    tasks sit idle most of the time, and torch uses them."""
    return max(1, min(round(free / tasks), int(max(node_cpus))))
