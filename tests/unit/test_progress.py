"""Off a terminal, progress is a few log lines, not a bar redrawn into the log."""

from tqdm import tqdm

from leaf_ray import progress


def test_off_a_terminal_progress_is_a_line_every_interval_and_the_last(capsys, monkeypatch):
    assert isinstance(progress.progress(10, "x", terminal=True, disable=True), tqdm)
    clock = iter(range(0, 1000, 7))  # seconds: 7 a step
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.progress(total=20, desc="eval: embedding", terminal=False) as bar:
        for _ in range(20):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    # 7 s a step, a line every 30 s: after steps 5, 10, 15, then the last
    assert lines == [f"eval: embedding {n}/20" for n in (5, 10, 15, 20)]
