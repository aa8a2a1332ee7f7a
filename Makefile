# make repro  - set up .venv if missing/stale, then run the DVC pipeline (embedded default)
# make test   - set up .venv if missing/stale, then run the test suite
# PRESET=smoke make repro  - apply presets/smoke.yaml to params.yaml first
# make flow   - the same DAG as a Prefect flow, one task per DVC stage
# make ui     - the Prefect UI on 127.0.0.1:4200 (export PREFECT_API_URL=http://127.0.0.1:4200/api)
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

flow: setup  ## the DVC pipeline as a Prefect flow; TARGETS="report" JOBS=2 RETRIES=1 FORCE=1
	$(PY) -m flows.pipeline --repo . $(foreach t,$(TARGETS),--target $(t)) --max-concurrency $(or $(JOBS),1) --retries $(or $(RETRIES),0) $(if $(FORCE),--force)

ui: setup  ## Prefect UI on http://127.0.0.1:4200; runs show there with PREFECT_API_URL=http://127.0.0.1:4200/api
	$(PY) -m prefect server start --host 127.0.0.1 --port 4200

clean-work:  ## training work dirs (resumable checkpoints); outputs stay in DVC
	rm -rf work_dirs
