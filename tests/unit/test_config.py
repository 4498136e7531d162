from pathlib import Path

import pytest

from leaf_ray.cli import DEFAULT_CONFIG, main
from leaf_ray.config import ConfigError, LeafConfig, load_config

MINIMAL = """\
data:
  sources:
    - path: texts.jsonl
teacher:
  model: sentence-transformers/all-MiniLM-L6-v2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_demo_config_validates_and_resolves_paths_against_its_folder():
    cfg = load_config(DEFAULT_CONFIG)
    repo = DEFAULT_CONFIG.parent.parent
    assert cfg.data.sources[0].path == str(repo / "data" / "demo" / "train.jsonl.gz")
    assert cfg.eval.datasets == [str(repo / "data" / "demo" / "debian_desc")]
    assert cfg.teacher.model == "sentence-transformers/all-MiniLM-L6-v2"  # hub names stay names
    assert cfg.train.batch_size == 32


def test_unknown_key_is_named_with_file_and_line(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:8: train.learning_rate: unknown key" in str(err.value)


def test_bad_value_is_named_with_its_key_path(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:7: train.epochs: Input should be greater than 0 (got 0)" in str(err.value)


def test_what_is_scored_is_named_once_and_sizes_are_positive(tmp_path):
    path = write(tmp_path, MINIMAL + "eval:\n  dimensions: [256, 64, 256, 64]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:7: eval.dimensions: repeats 256, 64: each is scored once" in str(err.value)
    with pytest.raises(ConfigError, match=r"eval.quantizations: repeats int8"):
        load_config(path, ["eval.dimensions=[]", "eval.quantizations=[int8,float32,int8]"])
    with pytest.raises(ConfigError, match=r"eval.dimensions.0: Input should be greater than 0"):
        load_config(path, ["eval.dimensions=[0]"])


def test_a_run_name_is_one_folder(tmp_path):
    path = write(tmp_path, MINIMAL + "run:\n  name: team/run-1\n")
    with pytest.raises(ConfigError, match=r":7: run\.name: String should match pattern"):
        load_config(path)
    spaced = tmp_path / "my run (v2).yaml"
    spaced.write_text(MINIMAL)
    assert load_config(spaced).run_name().startswith("my_run_v2_-")


def test_cross_field_training_rules_name_their_key_and_line(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  num_workers: 2\n  batch_size: 31\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:8: train.batch_size: 31 is not a multiple of num_workers" in str(err.value)
    path = write(tmp_path, MINIMAL + "train:\n  epochs: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:7: train.epochs: 4 is not a multiple of cycles (3;" in str(err.value)
    assert load_config(path, ["train.cycles=2"]).train.cycles == 2


def test_storage_uris_with_credentials_are_refused_without_echoing_them(tmp_path):
    """They would be written into the run's config.yaml; a URI without them is accepted."""
    uri = "s3://AKIAEXAMPLE:hunter2@bucket/leaf?endpoint_override=minio:9000"
    path = write(tmp_path, MINIMAL + f"run:\n  storage: {uri}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:7: run.storage: the URI holds credentials" in str(err.value)
    assert "hunter2" not in str(err.value)
    for key in ("teacher.cache_dir", "eval.cache_dir"):
        with pytest.raises(ConfigError, match=rf"{key}: the URI holds credentials"):
            load_config(path, ["run.storage=runs", f"{key}=gs://user:pw@bucket/cache"])
    plain = "s3://bucket/leaf?endpoint_override=minio:9000&scheme=http"
    assert load_config(path, [f"run.storage={plain}"]).run.storage == plain


def test_error_inside_a_list_names_the_index(tmp_path):
    path = write(tmp_path, MINIMAL.replace("path: texts.jsonl", "path: a\n      hf_dataset: b"))
    with pytest.raises(ConfigError, match=r"data\.sources\.0: Value error, give exactly one"):
        load_config(path)


def test_missing_section_and_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="teacher: Field required"):
        load_config(write(tmp_path, "data:\n  sources: [{path: x}]\n"))
    with pytest.raises(ConfigError, match="train.batch_size: 32 is not a multiple of num_workers"):
        load_config(write(tmp_path, MINIMAL), ["train.num_workers=3"])
    # A black-box teacher has no layers to copy: the error names the student's key and line.
    black_box = MINIMAL + "  vectors: v.parquet\nstudent:\n  init: layer_reduction\n"
    with pytest.raises(ConfigError, match=r"cfg.yaml:8: student.init: a black-box teacher"):
        load_config(write(tmp_path, black_box))
    pretrained = ["student.init=pretrained", "student.model=m", "teacher.http.url=http://h/v1"]
    with pytest.raises(ConfigError, match="give at most one of 'vectors' or 'http'"):
        load_config(write(tmp_path, black_box), pretrained)
    with pytest.raises(ConfigError, match="'tokenizer_actors' is for sentence-transformers"):
        load_config(write(tmp_path, black_box), [*pretrained[:2], "teacher.tokenizer_actors=2"])
    cfg = load_config(write(tmp_path, black_box), pretrained[:2])
    assert (cfg.teacher.backend, cfg.teacher.vectors) == ("vectors", str(tmp_path / "v.parquet"))


def test_overrides_set_single_keys_and_list_items(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["train.epochs=3", "data.sources.0.limit=10", "teacher.sha256=null"],
    )
    assert cfg.train.epochs == 3
    assert cfg.data.sources[0].limit == 10
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(write(tmp_path, MINIMAL), ["train.epochs"])


def test_a_bad_override_is_named_as_the_override_not_as_the_file(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  epochs: 3\neval:\n# dimensions: [64]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.epochs=many"])
    assert "override 'train.epochs=many': train.epochs: Input should be a valid integer" in str(
        err.value
    )
    with pytest.raises(ConfigError, match=r"override 'nonexistent.key=1': nonexistent: unknown"):
        load_config(path, ["nonexistent.key=1"])
    # A section left empty in the file takes an override as an absent one does.
    assert load_config(path, ["eval.max_seq_length=128"]).eval.max_seq_length == 128
    with pytest.raises(ConfigError, match=r"train.lr: Input should be a finite number"):
        load_config(path, ["train.lr=.inf"])


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"cfg.yaml:8: train.epochs: given twice \(also line 7\)"):
        load_config(write(tmp_path, MINIMAL + "train:\n  epochs: 1\n  epochs: 7\n"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ConfigError, match=r"binary.yaml: not a text file"):
        load_config(binary)
    # From the command line: exit 2, and the line names the file rather than YAML's own error.
    for config in (tmp_path, tmp_path / "nope.yaml", binary):
        assert main(["distill", "--config", str(config), "--dry-run"]) == 2
        assert capsys.readouterr().err.startswith(f"leaf-ray: error: {config}: ")


def test_cli_exits_nonzero_with_a_clear_message(tmp_path, capsys):
    path = write(tmp_path, MINIMAL + "student:\n  init: magic\nrun:\n  storage: out\n")
    assert main(["distill", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "leaf-ray: error: invalid config" in err
    assert f"{path}:7: student.init" in err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    ("recipe", "teacher"),
    [
        ("leaf-ir", "Snowflake/snowflake-arctic-embed-m-v1.5"),
        ("leaf-mt", "mixedbread-ai/mxbai-embed-large-v1"),
    ],
)
def test_paper_recipes_validate_offline(recipe, teacher, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub names must not be looked up
    config = DEFAULT_CONFIG.parent / f"{recipe}.yaml"
    assert main(["distill", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"1. teacher {teacher} (sentence-transformers)" in out
    assert "pretrained: nreimers/MiniLM-L6-H384-uncased, max length 512" in out
    assert "30 epoch(s) in 3 cycle(s) of batch 32" in out
    assert "lr 0.0001 -> 1e-05 per cycle" in out
    cfg = load_config(config)
    assert len(cfg.data.sources) == 7
    assert {s.kind for s in cfg.data.sources} == {"query", "document"}  # both, as in LEAF
    for source in cfg.data.sources:
        assert f"hf:{source.hf_dataset}:{source.hf_config}:{source.split}:" in out


def test_an_endpoint_with_or_without_its_trailing_slash_is_one_teacher():
    from leaf_ray.config import TeacherConfig

    slashed, bare = (
        TeacherConfig(model="e5", http={"url": url})
        for url in ("http://h:8000/v1/", "http://h:8000/v1")
    )
    assert slashed == bare and bare.http.url == "http://h:8000/v1"


def test_a_datasets_folder_beside_the_config_is_a_folder_not_a_hub_name(tmp_path):
    (tmp_path / "texts").mkdir()
    path = write(tmp_path, MINIMAL.replace("path: texts.jsonl", "hf_dataset: texts"))
    hub = write(tmp_path / "texts", MINIMAL.replace("path: texts.jsonl", "hf_dataset: org/texts"))
    assert load_config(path).data.sources[0].hf_dataset == str(tmp_path / "texts")
    assert load_config(hub).data.sources[0].hf_dataset == "org/texts"


def test_precomputed_vectors_are_not_streamed():
    """Precomputed vectors are ingested into the teacher cache: a streaming run would have no
    teacher to stream from."""
    config = {
        "data": {"sources": [{"path": "texts.jsonl"}]},
        "teacher": {"model": "m", "vectors": "v.parquet"},
        "student": {"init": "pretrained", "model": "s"},
        "train": {"data_mode": "streaming"},
    }
    with pytest.raises(ValueError, match="train.data_mode: precomputed vectors are read from"):
        LeafConfig.model_validate(config)
    config["train"]["data_mode"] = "cached"
    assert LeafConfig.model_validate(config).teacher.backend == "vectors"
