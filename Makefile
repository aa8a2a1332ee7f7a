# make repro               set up .venv if missing/stale, check params, run the DVC pipeline (embedded default)
# make repro PRESET=smoke  the same for presets/smoke.yaml, in its own worktree (.presets/smoke); params.yaml untouched
# make test                the whole test suite (what CI runs);  make test-fast: the unit subset (< 2 min)
# make flow                the same Prefect flow, recorded as a DVC experiment (PRESET=, TARGETS=, JOBS=, SCHEDULER=);
#                          make serve: a Prefect deployment
# make ui                  the Prefect UI on 127.0.0.1:4200 (export PREFECT_API_URL=http://127.0.0.1:4200/api)
# make publish PRESET=name copy a finished preset run's report to reports/presets/<name>/, with its commit
# make review              a reviewer's check of the checked-out commit: pull, repro, compare the metrics
VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
JOBS   ?= 2
FLOW_ARGS = --jobs $(JOBS) $(foreach t,$(TARGETS),--target $(t)) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) \
            $(if $(NO_SHARED_FS),--no-shared-fs)

.PHONY: setup check repro test test-fast lint flow serve ui review publish clean-work

setup:
	@bash scripts/setup_env.sh

check: setup  ## params.yaml (or the preset) against the schema, before DVC touches any output
ifdef PRESET
	@$(PY) -m dfmsd.check --preset $(PRESET)
else
	@$(PY) -m dfmsd.check
endif

repro: setup  ## flows.cli: params checked (make check) if a stage is to run, then the flow; SCHEDULER=, NO_SHARED_FS=1
ifdef PRESET
	$(PY) -m flows --preset $(PRESET) $(FLOW_ARGS)
else
	$(PY) -m flows --no-experiment $(FLOW_ARGS)
	dvc metrics show
endif

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m fast $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

flow: setup  ## TARGETS="report" JOBS=2 RETRIES=1 FORCE=1 PRESET=smoke SCHEDULER=tcp://host:port
	$(PY) -m flows $(if $(PRESET),--preset $(PRESET)) $(FLOW_ARGS) --retries $(or $(RETRIES),0) $(if $(FORCE),--force)

serve: setup  ## a Prefect deployment: start runs from the UI with a preset and targets as parameters
	$(PY) -m flows.serve

ui: setup
	$(PY) -m flows.ui --host 127.0.0.1 --port 4200  # prefect server start, each graph edge listed once

review: setup  ## REBUILD=1: rebuild what cannot be pulled
	$(PY) -m flows.review --jobs $(JOBS) $(if $(REBUILD),--rebuild)

publish: setup  ## PRESET=name: its finished run's report -> reports/presets/<name>/ (refused if stale or uncommitted)
	$(PY) -m flows.publish $(PRESET)

clean-work:  ## training work dirs (resumable checkpoints); outputs stay in DVC
	rm -rf work_dirs
