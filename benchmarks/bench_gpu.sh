#!/usr/bin/env bash
# Time the real-size configurations on one GPU in one command (<= 8 minutes; random weights):
# MAISI VAE encode/decode of one 128^3 volume, base_gpu and lora_fcd training steps (fp32 vs bf16, peak memory)
# on 32^3 latents at batch 8, 1-step vs 50-step Euler time per generated pair.
# JSON: benchmarks/results/bench_gpu.json (commit it with the card named in env.gpu).
#
#   bash benchmarks/bench_gpu.sh                  # needs CUDA
#   bash benchmarks/bench_gpu.sh --compile        # also time the torch.compile'd fp32 step
#   bash benchmarks/bench_gpu.sh --smoke          # CPU, reduced sizes: checks the script (not the benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
case " $* " in
  *" --smoke "*) exec "$PYTHON" benchmarks/bench_gpu.py "$@" ;;
esac
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh: no CUDA device (use --smoke on CPU)')"
exec timeout 480 "$PYTHON" benchmarks/bench_gpu.py --device cuda --threads "${THREADS:-8}" "$@"
