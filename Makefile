# Two commands: `make demo` and `make test`. Both set everything up first (Debian packages, .venv, pinned
# CPU torch) and can be run again at no cost: set-up is redone only when pyproject.toml or constraints.txt change.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the project needs at run or test time (chromium: the dashboard's browser tests).
APT_PACKAGES := libportaudio2 alsa-utils systemd mosquitto mosquitto-clients openssl chromium
DEMO := demo-out

.PHONY: setup system-deps demo test lint typecheck bench clean ha-setup test-ha

# A real Home Assistant for the tests, in its own virtual environment: the newest release Python 3.13
# runs (later ones need Python >= 3.14.2), plus what the integrations it loads install at run time (MQTT's
# client; the frontend, which HA loads whatever the config), so that it never fetches anything at start.
HA_VERSION := 2025.4.4
HA_RUNTIME := paho-mqtt==2.1.0 home-assistant-frontend==20250411.0
# Inside .venv: an environment of its own, out of the project's tree (and removed with .venv).
HA_VENV := $(VENV)/homeassistant
HA_STAMP := $(HA_VENV)/.installed-$(HA_VERSION)
HA_PYTHON ?= $(shell for p in "$$(command -v python3.13)" $(HOME)/.pyenv/versions/3.13*/bin/python3.13 \
    /root/.pyenv/versions/3.13*/bin/python3.13; do \
    "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null && { echo "$$p"; break; }; \
  done)

setup: $(STAMP)

system-deps:
	@missing=""; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="python3-venv"; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins every dependency, torch to its CPU build: a fresh machine never fetches CUDA.
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fixtures.synth --out $(DEMO)/train --normal 20 --per-fault 0 --seed 0
	$(BIN)/python -m fixtures.synth --out $(DEMO)/test --normal 4 --per-fault 2 --seed 1
	$(BIN)/python -m training.train --normal $(DEMO)/train/normal --out $(DEMO)/bundle \
	    --preset configs/train-small.toml --name demo-machine
	@echo; echo "== anomalyd score: 4 normal and 6 faulty clips the model has never heard =="
	@# Exit status 1 means "some file is anomalous", which is what this demo expects to see.
	$(BIN)/anomalyd score --bundle $(DEMO)/bundle $(DEMO)/test/normal/*.wav $(DEMO)/test/anomaly/*.wav \
	    || [ $$? -eq 1 ]
	$(BIN)/python -m fixtures.synth --recording $(DEMO)/replay.wav --kind bearing --seconds 30 \
	    --onset 10 --until 20 --seed 1
	rm -f $(DEMO)/events.db $(DEMO)/events.db-wal $(DEMO)/events.db-shm
	@echo; echo "== anomalyd run: 30 s replayed in real time, a bearing fault from 10 s to 20 s =="
	$(BIN)/anomalyd run --config configs/demo.toml
	@echo; echo "== anomalyd events =="
	$(BIN)/anomalyd events --config configs/demo.toml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy anomalyd training fixtures

# Everything, the real Home Assistant included (the set-up of its environment is a minute once). Two test
# processes (pytest-xdist), each test file in one of them: most tests wait on real daemons, brokers and
# browsers rather than compute. TEST_PROCESSES=0 runs them all in this one process.
TEST_PROCESSES ?= 2
test: lint typecheck $(HA_STAMP)
	ANOMALYD_HA_VENV=$(abspath $(HA_VENV)) $(BIN)/python -m pytest -m 'homeassistant or not homeassistant' \
	    -n $(TEST_PROCESSES) --dist loadfile

ha-setup: $(HA_STAMP)

$(HA_STAMP): Makefile
	@test -n "$(HA_PYTHON)" || { echo "make test-ha: Home Assistant $(HA_VERSION) needs Python 3.13, and neither" \
	  "python3.13 nor ~/.pyenv/versions/3.13*/bin/python3.13 runs; install one or set HA_PYTHON=/path/to/python3.13" >&2; \
	  exit 1; }
	test -x $(HA_VENV)/bin/python || $(HA_PYTHON) -m venv $(HA_VENV)
	# uv (the installer Home Assistant itself uses) resolves and installs HA's ~200 packages far faster than pip.
	$(HA_VENV)/bin/python -m pip install -q uv==0.6.10
	UV_NATIVE_TLS=1 $(HA_VENV)/bin/uv pip install -q --python $(HA_VENV)/bin/python homeassistant==$(HA_VERSION)
	UV_NATIVE_TLS=1 $(HA_VENV)/bin/uv pip install -q --python $(HA_VENV)/bin/python $(HA_RUNTIME) \
	  -c $$($(HA_VENV)/bin/python -c 'import homeassistant, os; print(os.path.dirname(homeassistant.__file__))')/package_constraints.txt
	touch $(HA_STAMP)

# Only the check against a real Home Assistant (also part of `make test`).
test-ha: $(STAMP) $(HA_STAMP)
	ANOMALYD_HA_VENV=$(abspath $(HA_VENV)) $(BIN)/python -m pytest -m homeassistant -s tests/test_homeassistant_real.py

# The benchmark's models have the default architecture: the default (16-frame tiles, each frame
# reconstructed once, int8), the same tiles in float32, and whole windows in float32 (the preset
# configs/train-windows.toml: each frame four times). Weights do not change the speed, so a few epochs
# on synthetic audio make them (about 30 s). The whole takes about 6 minutes on 2 cores.
BENCH := bench-out
bench: $(STAMP)
	$(BIN)/python -m fixtures.synth --out $(BENCH)/train --normal 20 --per-fault 0 --seed 0
	$(BIN)/python -m training.train --normal $(BENCH)/train/normal --out $(BENCH)/bundle --epochs 3 -q \
	    --name bench
	$(BIN)/python -m training.train --normal $(BENCH)/train/normal --out $(BENCH)/tiles-float --epochs 3 -q \
	    --precision float32 --name bench-tiles-float
	$(BIN)/python -m training.train --normal $(BENCH)/train/normal --out $(BENCH)/windows --epochs 3 -q \
	    --preset configs/train-windows.toml --name bench-windows
	$(BIN)/python -m anomalyd.bench --bundle $(BENCH)/bundle --also $(BENCH)/tiles-float \
	    --also $(BENCH)/windows --json $(BENCH)/bench.json

clean:
	rm -rf $(VENV) $(DEMO) $(BENCH) .mypy_cache .ruff_cache .pytest_cache
