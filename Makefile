# NeuroMF: `make test` sets everything up on a fresh machine and runs the checks; `make demo` runs the main job.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first where no NVIDIA GPU is present, so the project's torch range
# does not pull a multi-GB CUDA build; GPU machines get pip's default (CUDA) build.
TORCH_CPU ?= torch==2.13.0
SYSTEM_PACKAGES := xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4 \
	libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
	libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1
# the suite on two worker processes, each taking whole test files (module fixtures are built once); tests marked
# slow (long end-to-end runs) are kept out of the suite's 10-minute budget: `make test-slow` runs them; the files
# are handed out in tests/conftest.py's order (the long ones first), not xdist's
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

.PHONY: test test-slow demo venv sysdeps lint validate pytest bench pretrain clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch build"; \
	else \
		echo "no GPU: installing the CPU torch build ($(TORCH_CPU))"; \
		$(BIN)/pip install --quiet "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

sysdeps:
	@if command -v xvfb-run >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q libGLX_mesa; then \
		echo "Xvfb and Mesa present"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Xvfb + Mesa for the napari widget tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "missing Xvfb/Mesa: install them with: sudo apt-get install $(SYSTEM_PACKAGES)"; exit 1; \
	fi

validate: venv
	$(BIN)/npe2 validate napari_neuromf/napari.yaml --imports   # the one manifest (the wheel ships it as is)

lint: venv
	$(BIN)/ruff check .

pytest: venv sysdeps
	xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m pytest $(PYTEST_ARGS)

test: venv sysdeps validate lint pytest

test-slow: venv sysdeps
	xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m pytest -m slow

demo: venv
	$(BIN)/neuromf demo

bench: venv
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_lora.py

pretrain: venv
	source $(BIN)/activate && bash scripts/pretrain_embedded.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
