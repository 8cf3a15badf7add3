#!/usr/bin/env bash
# One lent-GPU command (BUDGET_S seconds, default 540) that trains several variants of the 2 mm joint recipe side by
# side and judges each as the CPU rounds did: calibrate-guidance (--store), then per seed 16 pairs drawn with Euler
# 32 steps, FLAIR rendered by cond_fine, `neuromf evaluate`, and a pairs grid (scripts/pairs_grid.py). What the
# 2 CPU cores do in a day (about 35 min per training, 12 min per 16 rendered pairs) fits in one command.
# Results in $OUT: sweep.tar.gz.part-* (per run: adapter, losses.csv, loss curve, calibration.json, per seed
# metrics.json + pairs_grid.png; no checkpoint, no NIfTI), a log per run, setup.log:
# `cat sweep.tar.gz.part-* | tar -xz`.
#
#   OUT=/tmp/sweep_out bash scripts/gpu_joint_sweep.sh            # on the GPU machine, from the repository root
#   SMOKE=1 OUT=/tmp/sweep_out bash scripts/gpu_joint_sweep.sh    # CPU check of the script itself (tiny budgets)
#   VARIANTS="joint_b8 joint_long" ...                            # only these variants
#   JUDGE=few_step OUT=/tmp/one_step bash scripts/gpu_joint_sweep.sh   # one-network few-step variants (below)
#
# JUDGE=few_step (docs/one_step.md) trains the mf_* variants instead: the same recipe with more r != t samples
# (the average velocity that 1-2 step sampling reads) and the finite-difference du/dt (or the exact JVP, as the
# control of a whole run), and judges each at 1 and 2 MeanFlow steps, joint guidance 1 (1 and 2 network calls),
# without --render, on seeds 200-202 that no calibration used.
#
# Needs .site/*.tar.gz (`bash scripts/gpu_session.sh --pack`) named in the device call's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
T0=$(date +%s)
END=$((T0 + ${BUDGET_S:-540}))
PY="$(command -v python3)"
RUNS=/tmp/neuromf_sweep
mkdir -p /tmp/neuromf_site "$RUNS"
for archive in .site/*.tar.gz; do [ -f "$archive" ] && tar -xzf "$archive" -C /tmp/neuromf_site; done
export PYTHONPATH="$PWD/backend:$PWD:/tmp/neuromf_site" PYTHONUNBUFFERED=1
if [ -n "${SMOKE:-}" ]; then  # this machine's latent cache already holds the unaugmented 2 mm latents
  PY="$PWD/.venv/bin/python"
  DEVICE=cpu STEPS_SHORT=2 STEPS_LONG=3 AUG=1 N=2 SEEDS="0" EULER=2 SCALES="1 1.1" CAL_N=2 THREADS=1
  CACHE="${NEUROMF_CACHE:-$HOME/.cache/neuromf/latents}" EVAL_S=60 VARIANTS=${VARIANTS:-"joint_b8 joint_aug8_long"}
  [ "${JUDGE:-}" = few_step ] && VARIANTS="mf_fd_r75"
else
  DEVICE=cuda STEPS_SHORT=350 STEPS_LONG=${STEPS_LONG:-800} AUG=8 N=16 SEEDS="0 1 2" EULER=32
  SCALES="0.8 0.9 1 1.05 1.1 1.2" CAL_N=8 THREADS=3 CACHE=/tmp/neuromf_cache EVAL_S=${EVAL_S:-170}
  [ "${JUDGE:-}" = few_step ] && SEEDS="200 201 202" STEPS_LONG=${FEW_STEPS:-1500}
fi
if [ "${JUDGE:-}" = few_step ]; then VARIANTS=${VARIANTS:-"mf_fd_r75 mf_fd_r50 mf_exact_r75"}
else VARIANTS=${VARIANTS:-"joint_b8 joint_aug8 joint_aug8_long joint_aug8_long_s1 joint_long"}; fi
"$PY" -c "import monai, nibabel, peft, neuromf; print('monai', monai.__version__, 'peft', peft.__version__)" \
  >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
(nvidia-smi || true) >>"$OUT/setup.log" 2>&1
# the 2 mm phantoms (85 FCD + 85 healthy, seed 0) are made on first use, and every variant's latents (the
# augmented copies too) are encoded once into one cache that the runs then only read: on the round-10 H200 (gVisor)
# the phantoms took 71 s and five runs encoding for themselves took the rest of the budget
"$PY" - >>"$OUT/setup.log" 2>&1 <<PYTHON
from neuromf.config import load_config
from neuromf.data.augment import AffineAugment
from neuromf.data.fcd_dataset import FCDDataset
from neuromf.models.flow_model import read_model_meta
from neuromf.pipelines.conditional import stage2_preprocessing
from neuromf.vae import vae_for
cfg = load_config("joint_2mm", {"data.augment_copies": $AUG})
meta = read_model_meta("embedded")
FCDDataset(cfg.data.data_dir, "sdf", vae=vae_for(meta, "$DEVICE"), prep=stage2_preprocessing(meta, cfg),
           cache_dir="$CACHE", flip=True, split=cfg.data.split, augment=AffineAugment.from_config(cfg.data))
PYTHON
echo "phantoms and latents done at +$(( $(date +%s) - T0 )) s" >>"$OUT/setup.log"

left() { echo $(( END - $(date +%s) )); }
budget() { local s=$(( $(left) - $1 )); echo $(( s > 5 ? s : 5 )); }  # seconds to the end, less a share kept
variant() {  # name, at most this many steps (the cosine schedule's length when they fit before the evaluation's
  local name=$1 steps=$2 dir="$RUNS/$1"  # share of the budget), then --set overrides: train (an adapter is saved
  shift 2                                # by the deadline whatever the step rate), calibrate, draw and judge
  [[ " $VARIANTS " == *" $name "* ]] || return 0
  local sets=(--set training.checkpoint_every=0 --set training.device="$DEVICE" --set data.cache_dir="$CACHE")
  for kv in "$@"; do sets+=(--set "$kv"); done
  export OMP_NUM_THREADS=$THREADS
  {
    "$PY" scripts/train_for.py --pipeline lora --config joint_2mm --base embedded --max-steps "$steps" \
      --deadline $(( END - EVAL_S )) --calibrate-steps $(( steps < 30 ? 2 : 30 )) \
      --set training.output_dir="$dir" "${sets[@]}" || return
    if [ "${JUDGE:-}" = few_step ]; then  # draw every (steps, seed) set on the GPU first, then judge them in parallel
      for k in 2 1; do
        for seed in $SEEDS; do
          [ "$(left)" -gt 45 ] || break
          timeout $(budget 30) "$PY" -m neuromf generate --adapter "$dir/adapter" --mode joint --sampler meanflow \
            --steps $k --joint-guidance 1 --no-render --n "$N" --seed "$seed" --device "$DEVICE" \
            --out "$dir/gen_k${k}_s$seed" || break
        done
      done
      for gen in "$dir"/gen_k*; do
        OMP_NUM_THREADS=1 timeout $(budget 8) "$PY" -m neuromf evaluate --adapter "$dir/adapter" --mode joint \
          --generated "$gen" --data embedded --out "$gen/metrics.json" >"$gen/evaluate.log" 2>&1 &
      done
      wait
      for gen in "$dir"/gen_k*; do "$PY" scripts/pairs_grid.py "$gen" >/dev/null 2>&1 & done
      wait
      return
    fi
    timeout $(budget 60) "$PY" -m neuromf calibrate-guidance --adapter "$dir/adapter" --store --n "$CAL_N" \
      --steps "$EULER" --scales $SCALES --device "$DEVICE" --out "$dir/calibration.json"
    for seed in $SEEDS; do
      [ "$(left)" -gt 40 ] || break
      timeout $(budget 20) "$PY" -m neuromf generate --adapter "$dir/adapter" --mode joint \
        --render embedded --sampler euler --steps "$EULER" --n "$N" --seed "$seed" --device "$DEVICE" \
        --out "$dir/gen_s$seed" || break
      "$PY" -m neuromf evaluate --adapter "$dir/adapter" --mode joint --generated "$dir/gen_s$seed" \
        --data embedded --out "$dir/gen_s$seed/metrics.json"
      "$PY" scripts/pairs_grid.py "$dir/gen_s$seed"
    done
  } >"$OUT/$name.log" 2>&1
}
variant joint_b8 "$STEPS_SHORT" &
variant joint_aug8 "$STEPS_SHORT" data.augment_copies=$AUG &
variant joint_aug8_long "$STEPS_LONG" data.augment_copies=$AUG &
variant joint_aug8_long_s1 "$STEPS_LONG" data.augment_copies=$AUG training.seed=1 &
variant joint_long "$STEPS_LONG" &
variant mf_fd_r75 "$STEPS_LONG" loss.jvp=finite_difference loss.ratio_r_neq_t=0.75 data.augment_copies=$AUG &
variant mf_fd_r50 "$STEPS_LONG" loss.jvp=finite_difference loss.ratio_r_neq_t=0.5 data.augment_copies=$AUG &
variant mf_exact_r75 "$STEPS_LONG" loss.ratio_r_neq_t=0.75 data.augment_copies=$AUG &
wait
echo "runs done at +$(( $(date +%s) - T0 )) s" >>"$OUT/setup.log"
# the device returns at most 8 files of <= 16 MiB: everything but checkpoints and volumes, as one archive in parts
(cd "$RUNS" && tar -czf - --exclude='checkpoint*' --exclude='*.nii.gz' --exclude='previews' --exclude='*_calibration' .) \
  | split -b 15M - "$OUT/sweep.tar.gz.part-"
echo "done at +$(( $(date +%s) - T0 )) s" >>"$OUT/setup.log"
