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
    # The first step (the work has started), then 7 s a step and a line every 30 s, the last
    assert lines == [f"eval: embedding {n}/20" for n in (1, 6, 11, 16, 20)]


def test_loading_weights_draws_no_bar_and_hub_downloads_keep_theirs(tiny_student, tmp_path, capfd):
    from huggingface_hub import utils as hub_utils
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    from leaf_ray.config import TeacherConfig
    from leaf_ray.teacher.local import load_teacher

    folder = tmp_path / "model"
    tiny_student.save_pretrained(str(folder))
    transformers_logging.enable_progress_bar()  # as a process that never loaded a leaf-ray model
    capfd.readouterr()
    SentenceTransformer(str(folder), device="cpu")
    assert "Loading weights" in capfd.readouterr().err  # what every worker would log

    load_teacher(TeacherConfig(model=str(folder)))
    assert "Loading weights" not in capfd.readouterr().err
    assert not hub_utils.are_progress_bars_disabled()
