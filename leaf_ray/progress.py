"""Progress for a person at a terminal, and for a log: a bar on a terminal; elsewhere (CI,
`ray job logs`, `make demo > log`) a line every LOG_EVERY_S seconds, since a bar redrawn into a
file is one line per redraw.

    with progress(total=120, desc="eval: embedding") as bar:
        bar.update(1)
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 30.0


def on_terminal() -> bool:
    return sys.stderr.isatty()


class LogLines:
    """A bar's stand-in off a terminal: `<desc> <done>/<total>` at the first update (the work
    has started), then at most every LOG_EVERY_S seconds, and at the end."""

    def __init__(self, total: int, desc: str, done: int = 0, quiet: bool = False):
        self.total, self.desc, self.done, self.quiet = total, desc, done, quiet
        self.last = -math.inf

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.quiet:  # counts without printing: a worker that is not rank 0
            return
        started = n > 0  # not where a bar starts (or resumes) before its first step
        if started and time.monotonic() - self.last >= LOG_EVERY_S or self.done >= self.total:
            self.last = time.monotonic()
            # Not `print`: in Ray Train's workers it goes to Train's logger and is teed to the
            # worker's stderr too, two lines for one.
            sys.stderr.write(f"{self.desc} {self.done}/{self.total}\n")
            sys.stderr.flush()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        pass

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def quiet_weight_loading() -> None:
    """Turn off transformers' weight-loading bar, which every Ray worker that loads a model
    (teacher actors, trainers, eval tasks) would draw into the logs. Hub downloads keep their
    bars (transformers' switch turns those off too). Called where weights load, not on import:
    the processes that only unpickle leaf-ray's functions (Ray Train's controller, Ray Data's
    coordinators and tasks) then never import transformers."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    hub_bars = not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if hub_bars:
        hub_utils.enable_progress_bars()


def progress(total: int, desc: str, terminal: bool | None = None, **bar) -> tqdm | LogLines:
    """A tqdm bar on a terminal, else LogLines. `terminal`: decided elsewhere (a Ray worker's
    stderr is never a terminal; its driver's may be)."""
    if terminal if terminal is not None else on_terminal():
        return tqdm(total=total, desc=desc, **bar)
    return LogLines(total, desc)
