# cogtune: `make demo` runs the whole pipeline on a tiny model on the CPU; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.toml
ARGS ?=
DEMO := demo

.PHONY: setup demo demo-assets preprocess train infer test bench clean

# The stamp is rebuilt only when pyproject.toml changes, so a second `make setup` takes no time.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(DEMO)/tiny-cogvideox/model_index.json: | setup
	$(BIN)/cogtune make-tiny-model $(DEMO)/tiny-cogvideox

$(DEMO)/data/videos.txt: | setup
	$(BIN)/cogtune make-demo-data $(DEMO)/data

demo-assets: $(DEMO)/tiny-cogvideox/model_index.json $(DEMO)/data/videos.txt

preprocess: setup
	$(BIN)/cogtune preprocess --config $(CONFIG) $(ARGS)

train: setup
	$(BIN)/cogtune train --config $(CONFIG) $(ARGS)

infer: setup
	$(BIN)/cogtune infer --config $(CONFIG) $(ARGS)

demo: setup demo-assets
	$(BIN)/cogtune preprocess --config configs/demo.toml | tee $(DEMO)/preprocess.out
	$(BIN)/cogtune train --config configs/demo.toml | tee $(DEMO)/train.out
	$(BIN)/cogtune infer --config configs/demo.toml | tee $(DEMO)/infer.out
	@echo
	@echo "MODEL: $(abspath $(DEMO)/tiny-cogvideox)"
	@echo "CACHE: $$(sed -n 's/^cache: //p' $(DEMO)/preprocess.out)"
	@echo "LORA: $$(sed -n 's/^lora: //p' $(DEMO)/train.out)"
	@echo "VIDEO: $$(sed -n 's/^video: //p' $(DEMO)/infer.out | head -n 1)"
	@echo "VALIDATION: $(abspath $(DEMO)/lora/validation) (mp4s and contact_sheet.png per step; loss_curve.png and README.md beside)"

test: setup
	$(BIN)/python -m pytest -q

# Side by side with the diffusers reference script: make bench REFERENCE=/path/to/diffusers
# (a git checkout of huggingface/diffusers). Without REFERENCE only cogtune is measured.
REFERENCE ?=
bench: setup
	$(BIN)/python bench/run.py $(if $(REFERENCE),--reference $(REFERENCE)) $(ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache bench/work
