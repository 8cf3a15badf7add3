#!/usr/bin/env bash
# Ship the adapter and report of a finished `neuromf demo` run as sample_data/models/lora_demo (the embedded demo
# adapter that the napari Generate widget and the "Generated pair" sample use). Run from the repository root after
# `make demo`; then update the figures in sample_data/models/lora_demo/README.md from demo_report/.
set -euo pipefail
run=${RUN:-runs/lora_demo}
exp=${EXPERIMENTS:-experiments}
dest=sample_data/models/lora_demo
report=$dest/demo_report
rm -rf "$report"
mkdir -p "$report/montages"
cp "$run"/adapter/{adapter_config.json,adapter_model.safetensors,neuromf_adapter.json} "$run/loss_curve.png" "$dest/"
cp "$exp"/phase_7/{verification_report.md,loss_curve.png} "$report/"
cp "$exp"/phase_7/montages/*.png "$report/montages/"
cp "$exp"/stage2_fcd/{mask_vae_test.json,ablation_lp.json} "$exp/stage2_fcd/metrics/metrics.json" "$report/"
# the sidecar names the base and data as "embedded", so the shipped adapter resolves on any machine
python - "$dest/neuromf_adapter.json" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
bad = {k: meta[k] for k in ("base_checkpoint", "vae", "data_dir") if meta.get(k) != "embedded"}
if bad:
    sys.exit(f"{sys.argv[1]}: demo adapter must reference embedded models and data, got {bad}")
PY
chmod -R u+rwX,go+rX "$dest"
echo "shipped $run as $dest"
