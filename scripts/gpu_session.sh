#!/usr/bin/env bash
# One lent-GPU session in one command (BUDGET_S seconds, default 530): the GPU benchmark while the 2 mm phantoms are
# generated on the CPU, then stage-2 runs side by side, each trained for the time left (scripts/train_for.py).
# Results go to $OUT: bench_gpu.json, a log per step and runs.tar.gz.part-* (each run's adapter, losses, loss
# curve, config and train_for.json; no checkpoint): `cat runs.tar.gz.part-* | tar -xz`.
#
#   OUT=/tmp/gpu_out bash scripts/gpu_session.sh          # on the GPU machine, from the repository root
#   SMOKE=1 OUT=/tmp/gpu_out BUDGET_S=240 bash scripts/gpu_session.sh   # CPU check of the script itself
#   bash scripts/gpu_session.sh --pack                 # here, first: .site/*.tar.gz from the venv
#
# The GPU image has PyTorch but not MONAI or nibabel: pure-Python copies travel as .site/*.tar.gz (in .gitignore,
# named in the device call's carry), peft too so that adapters are written by the same peft version as here.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--pack" ]; then
  site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p .site
  tar -czf .site/site.tar.gz -C "$site" --exclude=__pycache__ --exclude=tests monai nibabel
  tar -czf .site/peft.tar.gz -C "$site" --exclude=__pycache__ peft
  exit 0
fi
OUT="${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
T0=$(date +%s)
END=$((T0 + ${BUDGET_S:-530}))
PY="$(command -v python3)"
[ -x .venv/bin/python ] && [ -n "${SMOKE:-}" ] && PY="$PWD/.venv/bin/python"
RUNS=/tmp/neuromf_gpu_runs
mkdir -p /tmp/neuromf_site "$RUNS"
for archive in .site/*.tar.gz; do [ -f "$archive" ] && tar -xzf "$archive" -C /tmp/neuromf_site; done
export PYTHONPATH="$PWD/backend:$PWD:/tmp/neuromf_site" PYTHONUNBUFFERED=1
"$PY" -c "import monai, nibabel, peft, neuromf; print('monai', monai.__version__, 'peft', peft.__version__)" \
  >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
(nvidia-smi || true) >>"$OUT/setup.log" 2>&1

"$PY" -c "from neuromf.data.embedded import FINE_PHANTOMS, generated_phantoms; generated_phantoms(FINE_PHANTOMS, progress=False)" \
  >>"$OUT/setup.log" 2>&1 &
phantoms=$!
if [ -n "${SMOKE:-}" ]; then
  PYTHON="$PY" bash benchmarks/bench_gpu.sh --smoke >"$OUT/bench.log" 2>&1
  DEVICE=cpu STEPS_SAFETY=0.5 CALIBRATE=2 CACHE_ROOT=""  # the shared latent cache: this machine has it filled
else
  PYTHON="$PY" THREADS=8 timeout 200 bash benchmarks/bench_gpu.sh --budget-s "${BENCH_S:-100}" >"$OUT/bench.log" 2>&1
  DEVICE=cuda STEPS_SAFETY=0.85 CALIBRATE=30 CACHE_ROOT=/tmp/neuromf_cache_  # one per run: no two writers
fi
cp benchmarks/results/bench_gpu.json "$OUT/" 2>/dev/null
wait "$phantoms"
echo "bench + phantoms done at +$(( $(date +%s) - T0 )) s" >>"$OUT/setup.log"

train() {  # name, then train_for.py arguments
  local name=$1
  shift
  OMP_NUM_THREADS=4 "$PY" scripts/train_for.py --deadline "$END" --safety "$STEPS_SAFETY" --calibrate-steps "$CALIBRATE" \
    --set "training.output_dir=$RUNS/$name" ${CACHE_ROOT:+--set "data.cache_dir=$CACHE_ROOT$name"} \
    --set "training.device=$DEVICE" --set training.checkpoint_every=0 "$@" >"$OUT/$name.log" 2>&1
}
train joint_fine_b8 --pipeline lora --config joint_2mm --base embedded &
train joint_fine_b32 --pipeline lora --config joint_2mm --base embedded --set training.batch_size=32 &
train cond_demo --pipeline conditional --config conditional_3mm --base embedded-3mm &
wait
# the device returns at most 8 files of <= 16 MiB: the runs travel as one archive in 15 MB parts
(cd "$RUNS" && tar -czf - --exclude='checkpoint*' --exclude='*_calibration' .) | split -b 15M - "$OUT/runs.tar.gz.part-"
echo "done at +$(( $(date +%s) - T0 )) s" >>"$OUT/setup.log"
