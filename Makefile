# cogtune: `make demo` runs the whole pipeline on a tiny model on the CPU; `make test` runs the tests.
PYTHON ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c  # a stage that fails fails `make demo`, even piped into tee
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo
CONFIG ?= $(DEMO)/demo.toml
ARGS ?=

.PHONY: setup lock demo demo-assets preprocess train infer test test-fast test-latest test-oldest docs bench gpu-wheels bench-gpu clean

# The development environment is installed from the lock file, so every fresh clone, on any day,
# tests the versions that were tested here; `make lock` resolves the newest ones again. The stamp
# is rebuilt only when pyproject.toml or the lock change, so a second `make setup` takes no time.
LOCK := requirements/lock.txt
PIP_TOOLS := pip-tools==7.6.2
# `pip check`, except for decord 0.6.0's wheel, whose metadata names a cp36 tag (its file name says py3).
PIP_CHECK = $(1)/bin/python -m pip check > $(1)/pip-check.txt || \
	! grep -v '^decord 0.6.0 is not supported on this platform' $(1)/pip-check.txt
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $$(grep '^pip==' $(LOCK))
	$(BIN)/python -m pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(call PIP_CHECK,$(VENV))
	touch $@

setup: $(VENV)/.installed

# The demo's config (its paths are relative to its folder), written as `cogtune init` writes any family's.
$(DEMO)/demo.toml: | setup
	$(BIN)/cogtune init --family demo --force $(DEMO)

$(DEMO)/tiny-cogvideox/model_index.json: | setup
	$(BIN)/cogtune make-tiny-model $(DEMO)/tiny-cogvideox

$(DEMO)/data/videos.txt: | setup
	$(BIN)/cogtune make-demo-data $(DEMO)/data

demo-assets: $(DEMO)/demo.toml $(DEMO)/tiny-cogvideox/model_index.json $(DEMO)/data/videos.txt

preprocess: setup
	$(BIN)/cogtune preprocess --config $(CONFIG) $(ARGS)

train: setup
	$(BIN)/cogtune train --config $(CONFIG) $(ARGS)

infer: setup
	$(BIN)/cogtune infer --config $(CONFIG) $(ARGS)

demo: setup demo-assets
	$(BIN)/cogtune preprocess --config $(DEMO)/demo.toml | tee $(DEMO)/preprocess.out
	$(BIN)/cogtune train --config $(DEMO)/demo.toml | tee $(DEMO)/train.out
	$(BIN)/cogtune infer --config $(DEMO)/demo.toml | tee $(DEMO)/infer.out
	@echo
	@echo "MODEL: $(abspath $(DEMO)/tiny-cogvideox)"
	@echo "CACHE: $$(sed -n 's/^cache: //p' $(DEMO)/preprocess.out)"
	@echo "LORA: $$(sed -n 's/^lora: //p' $(DEMO)/train.out)"
	@echo "VIDEO: $$(sed -n 's/^video: //p' $(DEMO)/infer.out | head -n 1)"
	@echo "VALIDATION: $(abspath $(DEMO)/lora/validation) (mp4s and contact_sheet.png per step; loss_curve.png and README.md beside)"

# Two or more test processes (pytest-xdist, up to 4): much of the suite waits on the processes it starts.
test: setup
	COGTUNE_ENV=lock $(BIN)/python -m pytest -q --numprocesses auto --maxprocesses 4 --durations=15

# The unit tests alone (no tiny model, no command line, no second process): seconds, for the edit loop.
test-fast: setup
	COGTUNE_ENV=lock $(BIN)/python -m pytest -q -m "not e2e"

# The docs' generated parts: docs/flags.md from the settings, the families and memory tables from
# bench/results/estimates.json (python bench/estimates.py rewrites that). A test fails when they are stale.
docs: setup
	$(BIN)/python -m cogtune.dev.docs

# Resolve the lock again: the newest releases within pyproject.toml's ranges (and requirements/dev.in).
lock:
	test -x .venv-tools/bin/pip-compile || ($(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install --quiet $(PIP_TOOLS))
	.venv-tools/bin/pip-compile --quiet --upgrade --allow-unsafe --extra test --strip-extras --no-emit-index-url \
		--no-emit-find-links -o $(LOCK) pyproject.toml requirements/dev.in

# The suite against the newest releases pyproject.toml allows today (no lock), and against the
# floors of its ranges (each dependency at the lowest release it admits), each in its own venv.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
	$(call PIP_CHECK,.venv-latest)
	.venv-latest/bin/python -m pip list --format freeze | grep -iE '^(torch|diffusers|transformers|accelerate|peft|huggingface.hub|numpy)=='
	.venv-latest/bin/python -m pytest -q

test-oldest:
	test -x .venv-oldest/bin/python || $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --upgrade pip packaging
	.venv-oldest/bin/python requirements/floors.py > .venv-oldest/floors.txt
	.venv-oldest/bin/python -m pip install --quiet -c .venv-oldest/floors.txt -e '.[test]'
	$(call PIP_CHECK,.venv-oldest)
	.venv-oldest/bin/python -m pip list --format freeze | grep -iE '^(torch|diffusers|transformers|accelerate|peft|huggingface.hub|numpy)=='
	COGTUNE_ENV=oldest .venv-oldest/bin/python -m pytest -q

# Side by side with the diffusers reference script: make bench REFERENCE=/path/to/diffusers
# (a git checkout of huggingface/diffusers). Without REFERENCE only cogtune is measured.
REFERENCE ?=
bench: setup
	$(BIN)/python bench/run.py $(if $(REFERENCE),--reference $(REFERENCE)) $(ARGS)

# The one prepared GPU check (bench/gpu_check.py). The GPU machine we measure on has torch,
# torchvision, transformers, accelerate, peft, safetensors, pyarrow and sentencepiece, but no
# diffusers, PyAV, decord, torchao or quanto, and no network. `make gpu-wheels` here puts the lock's
# wheels of those, built for the GPU machine's Python (GPU_PYTHON), into bench/wheels/ (57 MiB, ignored by git:
# carry it with the working tree); with REFERENCE=<a diffusers checkout> it also copies the diffusers
# script there, for the side-by-side part. `make bench-gpu` there installs what the machine lacks
# from that folder alone (into bench/work/gpu-site) and runs the check from src/.
GPU_WHEELS := bench/wheels
GPU_PYTHON ?= 3.12
# import name:distribution name; torchao and quanto for the quantized settings (bitsandbytes' wheel, with
# its CUDA kernels, is over the 64 MiB the working tree may carry: its settings are not in the check).
GPU_PACKAGES := diffusers:diffusers av:av decord:decord torchao:torchao optimum.quanto:optimum-quanto
gpu-wheels: setup
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
		--dest $(GPU_WHEELS) $$(for p in $(GPU_PACKAGES); do grep -o "^$${p#*:}==[^ ;]*" $(LOCK); done)
	$(if $(REFERENCE),mkdir -p $(GPU_WHEELS)/reference/examples/cogvideo && \
		cp $(REFERENCE)/examples/cogvideo/train_cogvideox_lora.py $(GPU_WHEELS)/reference/examples/cogvideo/)

GPU_SITE := bench/work/gpu-site
bench-gpu:
	for p in $(GPU_PACKAGES); do $(PYTHON) -c "import $${p%:*}" 2>/dev/null || \
		PYTHONPATH=$(GPU_SITE) $(PYTHON) -c "import $${p%:*}" 2>/dev/null || $(PYTHON) -m pip install --quiet \
		--no-index --no-deps --target $(GPU_SITE) --find-links $(GPU_WHEELS) $${p#*:} || exit 1; done
	PYTHONPATH=$(CURDIR)/src:$(CURDIR)/$(GPU_SITE) $(PYTHON) bench/gpu_check.py \
		$(if $(wildcard $(GPU_WHEELS)/reference),--reference $(GPU_WHEELS)/reference) $(ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache bench/work
