# The two commands of the README: `make train` (the default ParaRL run) and `make test`.
# Both create .venv on a fresh machine; a second call reuses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv test train bench clean

venv: $(STAMP)

# torch + torchvision first and alone (the only pair whose torchvision imports here), then
# deepspeed with its shared-memory op prebuilt against that torch, then the project.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) wheel setuptools
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PIP) --no-build-isolation deepspeed==0.19.8
	$(PIP) -e ".[dev]"
	touch $(STAMP)

# the linter first (seconds), then the suite
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# The default run is offline and loopback-only (shared/reference/stack-notes.md); on a real cluster
# use `pararl train CONFIG` with your own environment instead.
OFFLINE := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HTTP_PROXY=http://127.0.0.1:9 NO_PROXY=127.0.0.1,localhost \
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
	HF_HUB_DISABLE_TELEMETRY=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DS_ACCELERATOR=cpu \
	TOKENIZERS_PARALLELISM=false

# overrides: make train ARGS="seed=1 run_dir=runs/seed1"
train: $(STAMP)
	env $(OFFLINE) $(PY) -m pararl.cli default-run $(ARGS)

bench: $(STAMP)
	$(PY) bench/sampler.py
	$(PY) bench/learner.py
	env $(OFFLINE) $(PY) bench/reward.py
	env $(OFFLINE) $(PY) bench/sync.py

clean:
	rm -rf $(VENV)
