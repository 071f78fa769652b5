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

test: $(STAMP)
	$(PY) -m pytest -q tests

train: $(STAMP)
	$(PY) -m pararl.cli train configs/default.yaml

bench: $(STAMP)
	$(PY) bench/sampler.py

clean:
	rm -rf $(VENV)
