#!/usr/bin/env bash
# Ship the adapters of a finished `neuromf demo` run as sample_data/models/lora_demo (joint mode) and
# sample_data/models/cond_demo (conditional mode): the embedded demo adapters that the napari Generate widget and
# the sample data use. Run from the repository root after `make demo`; then update the figures in the two cards
# (README.md of each) from the run's report (runs/report/verification_report.md; outputs are not shipped).
set -euo pipefail
run=${RUN:-runs/lora_demo}
cond_run=${COND_RUN:-runs/cond_demo}
dest=sample_data/models/lora_demo
cond_dest=sample_data/models/cond_demo
cp "$run"/adapter/{adapter_config.json,adapter_model.safetensors,neuromf_adapter.json} "$run/loss_curve.png" "$dest/"
if [[ -d $cond_run/adapter ]]; then
  mkdir -p "$cond_dest"
  # float16 storage keeps the ControlNet small; it is loaded back into float32 parameters
  python -c "import sys; from neuromf.weights import save_half_precision as h; h(sys.argv[1], sys.argv[2])" \
    "$cond_run/adapter/controlnet.safetensors" "$cond_dest/controlnet.safetensors"
  cp "$cond_run"/adapter/{mask_prior.safetensors,neuromf_adapter.json} "$cond_run/loss_curve.png" "$cond_dest/"
fi
# the sidecars name the base and data as "embedded-3mm", so the shipped adapters resolve on any machine
python - "$dest/neuromf_adapter.json" "$cond_dest/neuromf_adapter.json" <<'PY'
import json, sys
from pathlib import Path
for path in sys.argv[1:]:
    if not Path(path).is_file():
        continue
    meta = json.load(open(path))
    bad = {k: meta[k] for k in ("base_checkpoint", "vae", "data_dir") if meta.get(k) != "embedded-3mm"}
    if bad:
        sys.exit(f"{path}: demo adapter must reference embedded models and data, got {bad}")
PY
python scripts/update_weights_registry.py  # the new sha256s in sample_data/models/registry.json
chmod -R u+rwX,go+rX "$dest" "$cond_dest" 2>/dev/null || true
echo "shipped $run as $dest and $cond_run as $cond_dest"
