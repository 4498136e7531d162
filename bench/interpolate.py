"""A student between where training started and where it ended (WiSE-FT, Wortsman et al.,
CVPR 2022): every weight alpha * trained + (1 - alpha) * start, from a run folder's `student`
and `student_init`. Score it with the run's own evaluation:

    python bench/interpolate.py RUN 0.5 OUT
    leaf-ray eval --run RUN --student OUT      # the report: RUN/evals/<OUT's name>/eval.md
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("alpha", type=float, help="the trained student's share")
    parser.add_argument("out", type=Path, help="the interpolated student (a new folder)")
    args = parser.parse_args()
    trained, start = args.run / "student", args.run / "student_init"
    shutil.copytree(trained, args.out)  # config, tokenizer and module files as trained
    for weights in trained.rglob("*.safetensors"):
        end, begin = load_file(weights), load_file(start / weights.relative_to(trained))
        mixed = {k: args.alpha * end[k] + (1 - args.alpha) * begin[k] for k in end}
        save_file(mixed, args.out / weights.relative_to(trained), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
