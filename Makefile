# losa developer entry points. `make install` builds .venv in the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-all demo bench corpus reference-model reference-model-opt clean

$(BIN)/losa: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/losa

install: $(BIN)/losa

# compressed-tensors 0.14, the last release with the sparse decompressors, unpacked beside the venv
# (not installed into it): the export tests read our exports back with it, bit for bit
LEGACY_CT := $(VENV)/legacy-compressed-tensors
$(LEGACY_CT)/.done: | $(BIN)/losa
	$(BIN)/pip install -q --no-deps --upgrade --target $(LEGACY_CT) compressed-tensors==0.14.0.1
	touch $@

test: install $(LEGACY_CT)/.done
	LOSA_LEGACY_COMPRESSED_TENSORS=$(LEGACY_CT) $(BIN)/python -m pytest -q -m "not slow" tests

test-all: install $(LEGACY_CT)/.done
	LOSA_LEGACY_COMPRESSED_TENSORS=$(LEGACY_CT) $(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python examples/demo.py

bench: install
	$(BIN)/python benchmarks/run_all.py

# the offline corpus (Debian's Python / Perl docs + stdlib docstrings), built into data/corpus
corpus: install
	$(BIN)/python -m losa.reference.corpus --out data/corpus

# retrain the committed reference models (about 25 min each on 2 idle CPU cores); resumable
reference-model: corpus
	$(BIN)/python -m losa.reference.train --arch llama --corpus data/corpus --out models/reference-llama \
		--report benchmarks/results/reference_model.md

reference-model-opt: corpus
	$(BIN)/python -m losa.reference.train --arch opt --corpus data/corpus --out models/reference-opt \
		--report benchmarks/results/reference_model_opt.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
