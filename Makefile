# make repro  - set up .venv if missing/stale, then run the DVC pipeline (embedded default)
# make test   - set up .venv if missing/stale, then run the test suite
# PRESET=smoke make repro  - apply presets/smoke.yaml to params.yaml first
VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export OMP_NUM_THREADS ?= 2

.PHONY: setup repro test flow ui clean-work

setup:
	@bash scripts/setup_env.sh

repro: setup
ifdef PRESET
	$(PY) -m dfmsd.presets $(PRESET)
endif
	dvc repro
	dvc metrics show

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-work:  ## training work dirs (resumable checkpoints); outputs stay in DVC
	rm -rf work_dirs
