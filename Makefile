# Two commands do all set-up: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch==2.13.0: a CPU build where one is on disk; on a GPU machine pip takes the CUDA build of the same release.
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: run test test-fast bench install clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The main job: all four GPT-2 sizes on WikiText-2 raw (test split), local Ray, results under results/<run-id>/.
run: install
	$(BIN)/probe run $(ARGS)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The quick tier for the edit loop: everything not marked slow (no Ray, no end-to-end run).
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: install
	$(BIN)/python bench/mi.py
	$(BIN)/python bench/logit.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) results
