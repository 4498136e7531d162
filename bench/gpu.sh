#!/bin/bash
# The GPU benchmarks as one prepared script for a lent GPU machine (see docs/benchmarks.md):
# a random-weight bert-base teacher and MiniLM-L6-H384 student, built from carried tokenizer
# files, on carried real texts. Prepare here, from the repo root:
#   .whl/: wheels of what the machine lacks (pip download --only-binary=:all: -d .whl ...): Ray
#     2.60 without ray/jars (Java, unused; the whole wheel is over what a call carries), pydantic,
#     pydantic-core, annotated-types, typing-inspection, jsonschema, jsonschema-specifications,
#     referencing, rpds-py, tensorboardX, datasets, dill, multiprocess (Python 3.12, manylinux)
#   .gpu/tokenizer/ (a BERT-uncased tokenizer) and .gpu/debian-documents.jsonl.gz (texts)
# then run `bash bench/gpu.sh` there with carry [".whl", ".gpu"]. Results and logs land in $OUT
# (unset: results in bench/results/, logs in /tmp). Sizes: TEACHER_TEXTS, TEACHER_ROUNDS, TRAIN_TEXTS.
set -u -o pipefail
if ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 \
  RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  RAY_DATA_DISABLE_PROGRESS_BARS=1
OUT=${OUT:-}
logs=${OUT:-/tmp}
models=/tmp/leaf-ray-bench-models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, transformers, sentence_transformers as st, ray
print('torch', torch.__version__, 'transformers', transformers.__version__, 'st', st.__version__, 'ray', ray.__version__)"
python3 bench/random_model.py .gpu/tokenizer $models/bert-base --preset bert-base --max-seq-length 512 || exit 1
python3 bench/random_model.py .gpu/tokenizer $models/minilm --preset minilm-l6-h384 --max-seq-length 128 || exit 1

started=$(mktemp)  # results older than this file are earlier runs
date; timeout "${TEACHER_TIMEOUT:-180}" python3 bench/teacher.py --model $models/bert-base \
  --texts "${TEACHER_TEXTS:-24000}" --rounds "${TEACHER_ROUNDS:-2}" \
  --texts-file .gpu/debian-documents.jsonl.gz \
  --batch-size 256 --max-seq-length 512 2>&1 | tee $logs/teacher-gpu.log | grep -v "^\s*$"
# 8,000 texts: bench/train.py now runs three epochs a side (two of warm-up), as many rows as the
# two epochs of 12,000 this time limit was set for.
date; timeout "${TRAIN_TIMEOUT:-240}" python3 bench/train.py --teacher $models/bert-base \
  --student $models/minilm --texts "${TRAIN_TEXTS:-8000}" --batch-sizes 32 256 --rounds 1 --fast 2>&1 \
  | tee $logs/train-gpu.log | grep -v "^\s*$"
# One whole run in streaming mode: the teacher's actors and the student's training share the GPU.
# No eval datasets: mteb imports polars, whose 54 MB wheel does not travel beside Ray's within a
# call's 64 MiB, and the GPU machine has neither. The run still fits the student's projection,
# trains, checkpoints and publishes the student.
cat > $logs/streaming.yaml <<YAML
run: {name: gpu-streaming, storage: $logs/runs}
data: {sources: [{path: $PWD/data/demo/train.jsonl.gz, limit: 4000}]}
teacher: {model: $models/bert-base, max_seq_length: 128, batch_size: 256}
student: {init: pretrained, model: $models/minilm, max_seq_length: 128}
train: {num_workers: 1, epochs: 1, cycles: 1, batch_size: 32, data_mode: streaming, log_every: 20}
YAML
date; timeout "${DISTILL_TIMEOUT:-100}" python3 -m leaf_ray.cli distill --config $logs/streaming.yaml \
  > $logs/streaming-distill.log 2>&1
distilled=$?
tail -20 $logs/streaming-distill.log
python3 bench/gpu_summary.py --since "$started" --distill-exit $distilled \
  --distill-run $logs/runs/gpu-streaming
[ -n "$OUT" ] && cp bench/results/*-gpu.json bench/results/gpu-summary.json "$OUT"/ 2>/dev/null
ls bench/results
