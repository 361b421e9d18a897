#!/usr/bin/env bash
# One prepared check for the day a CUDA machine is lent: the CUDA-only tests, then LoRA, DoRA and QLoRA at
# roberta-base's shape (random init, offline tokenizer) in fp32 and bf16: step time, peak VRAM, bf16 autocast.
#
#   benchmarks/gpu_check.sh prepare   # here, with a package index: the wheels and the data subset it carries
#   benchmarks/gpu_check.sh run       # there: no index, no internet; about 7 minutes on an H200
#                                     # (GPU_CHECK_TESTS=0 skips the CUDA-only tests; GPU_CHECK_VARIANTS="lora dora" picks)
#
# The CUDA machine is assumed to have torch, transformers, peft, pandas, pyarrow, scikit-learn, scipy and
# matplotlib. Everything else the harness and its tests import is carried as wheels, listed (pinned, for CPython
# 3.11 on x86_64 Linux) in benchmarks/gpu_check_wheels.txt; `prepare` downloads them into
# benchmarks/gpu_check/wheels (gitignored, about 6 MB) and copies a small MRPC subset into
# benchmarks/gpu_check/data. Carry that folder with the working tree (the device tool's `carry`:
# ["benchmarks/gpu_check"]). For another Python, set GPU_CHECK_PYTHON_VERSION=3.12 (for example) before `prepare`.
#
# Without CUDA, `run` does every step up to the first one that needs it, then stops with exit status 3 and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=benchmarks/gpu_check
WHEELS=$HERE/wheels
DATA=$HERE/data
PY=${PYTHON:-$(command -v python || command -v python3)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

prepare() {
  local source=${DATA_DIR:-../shared/data}
  mkdir -p "$WHEELS" "$DATA/glue/mrpc"
  step "wheels -> $WHEELS"
  local target=()
  if [[ -n "${GPU_CHECK_PYTHON_VERSION:-}" ]]; then
    target=(--python-version "$GPU_CHECK_PYTHON_VERSION" --platform manylinux2014_x86_64 --only-binary=:all:)
  fi
  # antlr4-python3-runtime is published as a source archive only: built into a (pure-Python) wheel here, since
  # building it there would need setuptools from an index.
  grep -v -E '^(#|antlr4)' benchmarks/gpu_check_wheels.txt > "$HERE/binary.txt"
  $PY -m pip download --no-deps -q -d "$WHEELS" "${target[@]}" -r "$HERE/binary.txt"
  $PY -m pip wheel --no-deps -q -w "$WHEELS" "$(grep -E '^antlr4' benchmarks/gpu_check_wheels.txt)"
  ls -1 "$WHEELS"; du -sh "$WHEELS"
  step "data subset -> $DATA (MRPC: 1,024 train, 256 validation rows)"
  $PY - "$source" "$DATA" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

source, target = Path(sys.argv[1]), Path(sys.argv[2])
for split, n in (("train", 1024), ("validation", 256)):
    frame = pd.read_parquet(source / "glue" / "mrpc" / f"{split}.parquet").head(n)
    frame.to_parquet(target / "glue" / "mrpc" / f"{split}.parquet", index=False)
    print(split, len(frame), "rows")
EOF
}

run() {
  step "the packages the machine must already have"
  $PY - <<'EOF'
import importlib.util
missing = [m for m in ("torch", "transformers", "peft", "pandas", "pyarrow", "sklearn", "scipy", "matplotlib")
           if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"missing on this machine: {missing}; gpu_check.sh carries only benchmarks/gpu_check_wheels.txt")
import peft, torch, transformers
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| CUDA available", torch.cuda.is_available(),
      "| transformers", transformers.__version__, "| peft", peft.__version__)
print("bitsandbytes importable:", importlib.util.find_spec("bitsandbytes") is not None)
EOF
  step "carried wheels (no index)"
  [[ -d "$WHEELS" ]] || { echo "no $WHEELS: run 'benchmarks/gpu_check.sh prepare' where an index is reachable, and carry $HERE"; exit 2; }
  # --no-deps: the list is already the closure of what the machine lacks, and pip's resolver would otherwise refuse
  # over the machine's own versions of packages the list does not carry (datasets pins fsspec, say).
  $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" -r benchmarks/gpu_check_wheels.txt
  step "the harness imports and composes"
  $PY -c "import harness.run, harness.sweep, harness.report; print('harness imports')"
  $PY -m harness.inspect model=roberta_base model.init=random model.tokenizer=tiny_bpe variant=lora task=mrpc \
    data.dir="$DATA" | tail -3
  step "CUDA"
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: stopping before the first CUDA-only step (the CUDA tests). Everything above ran."
    exit 3
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if [[ "${GPU_CHECK_TESTS:-1}" == 1 ]]; then
    step "CUDA-only tests"
    $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
  fi
  step "first calls at new lengths: attention (per backend set) and a linear layer, bf16 and fp32"
  $PY benchmarks/sdpa_first_call.py
  # Each configuration runs twice, 40 and 140 steps: the first steps carry CUDA's lazy kernel loading and cuBLAS's
  # first calls for each new shape (length-grouped batches vary in length), so the steady cost of a step is the
  # difference of the two runs' train_seconds over the 100 steps between them.
  step "roberta-base shape: LoRA, DoRA, QLoRA x fp32, bf16 x 40, 140 steps (batches of 32 x <=128 tokens, length-grouped)"
  local out
  out=$(mktemp -d)
  for variant in ${GPU_CHECK_VARIANTS:-lora dora qlora}; do
    for precision in fp32 bf16; do
      for steps in 40 140; do
        $PY -m harness task=mrpc model=roberta_base model.init=random model.tokenizer=tiny_bpe variant=$variant \
          data.dir="$DATA" data.cache_dir="$out/cache" results_dir="$out" sweep_name=gpu_check device=cuda \
          train.precision=$precision train.group_by_length=true train.max_steps=$steps train.batch_size=32 \
          task.max_seq_len=128 save_adapter=false 2>&1 | grep -E "run [0-9a-f]+ (ok|failed|diverged|oom)|Error" || true
      done
    done
  done
  step "results (ms/step: over steps 1-40, and steady = steps 41-140, from the two runs' difference)"
  $PY - "$out/gpu_check" <<'EOF'
import json, sys
from harness.rows import read_rows
rows = read_rows(sys.argv[1])
mib = lambda v: f"{v / 2**20:.0f}" if v == v and v is not None else "-"
print(f"{'variant':<7} {'prec':<5} {'status':<7} {'ms/step 1-40':>12} {'steady ms/step':>14} {'steady samples/s':>16} "
      f"{'peak alloc MiB':>14} {'reserved MiB':>12} {'train pad':>9} backend")
for (variant, precision), group in rows.groupby(["variant", "precision"]):
    runs = {row["max_steps"]: row for row in group.to_dict("records")}
    short, long = runs.get(40), runs.get(140)
    for row in group.to_dict("records"):
        if row["status"] != "ok":
            print(f"{variant:<7} {precision:<5} {row['status']:<7} ({row['max_steps']} steps) {row['error']}")
    if not (short and long and short["status"] == long["status"] == "ok"):
        continue
    extra_seconds = long["train_seconds"] - short["train_seconds"]
    if extra_seconds > 0:
        steady_ms = f"{1e3 * extra_seconds / (long['steps'] - short['steps']):.1f}"
        extra_samples = (long["train_samples_per_s"] * long["train_seconds"]
                         - short["train_samples_per_s"] * short["train_seconds"])
        samples = f"{extra_samples / extra_seconds:.1f}"
    else:  # the longer run took less time: its one-off costs differ by more than the 100 steps cost
        steady_ms = samples = "unreadable"
    backend = json.loads(long["extra_json"] or "{}").get("quant_backend", "")
    print(f"{variant:<7} {precision:<5} {'ok':<7} {1e3 * short['train_seconds'] / short['steps']:>12.1f} "
          f"{steady_ms:>14} {samples:>16} {mib(long['cuda_peak_allocated_bytes']):>14} "
          f"{mib(long['cuda_peak_reserved_bytes']):>12} {long['train_padding_ratio'] or float('nan'):>9.3f} {backend}")
EOF
  step "done"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
