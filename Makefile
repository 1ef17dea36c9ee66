# llava-gguf: LLaVA 1.6 Vicuna 7B -> GGUF for llama.cpp, as numbered notebooks run by papermill.
#   make all               set up, build llama.cpp, run every step on params/default.yaml
#   make all PARAMS=params/llava-v1.6-vicuna-7b.yaml
#   make text FORCE=1      rerun one step (and whatever it needs that is out of date)
SHELL := /bin/bash
.DEFAULT_GOAL := help

PARAMS ?= params/default.yaml
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FORCE_FLAG := $(if $(filter 1 yes true,$(FORCE)),--force,)
# The steps are declared in the notebooks themselves (lib/llava_gguf/run/registry.py): one target each.
REGISTRY := $(PYTHON) lib/llava_gguf/run/registry.py
STEPS := $(shell $(REGISTRY) names)

.PHONY: help check-params setup constraints llama-cpp llama-cpp-unpatched webui all $(STEPS) report lab serve test test-fast bench clean-run \
	compare publish arm64-rehearsal rehearsal-x86 patch-check

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+( [a-zA-Z0-9_ -]+)?:.*## ' $(MAKEFILE_LIST) | \
	  awk -F':.*## ' '{printf "  \033[1m%-22s\033[0m %s\n", $$1, $$2}'
	@echo "  steps (make <step> runs it and what it needs when out of date):"
	@$(REGISTRY) help
	@echo "  variables: PARAMS=$(PARAMS) FORCE=1 LLAMA_CPP_DIR=<existing llama.cpp build>"

setup: $(STAMP) ## create .venv with the pinned Python packages (idempotent)

# Before anything slow: a venv with only pydantic and PyYAML (seconds) validates PARAMS, so a bad
# key or path stops `make all` before setup installs torch and before the llama.cpp build.
CHECKER := $(VENV)/.params-checker
$(CHECKER): $(wildcard constraints/*.txt)
	@$(PINS) constraints-file >/dev/null
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet pydantic pyyaml -c "$$($(PINS) constraints-file)"
	@touch $@

check-params: $(CHECKER) ## validate PARAMS (every key, type and path) in seconds, before setup and the build
	@PYTHONPATH="$(abspath lib)" $(PY) -m llava_gguf.run.params_check "$(PARAMS)"

# The constraints file pins every package for this machine and Python (an unsupported pair stops
# here, naming the supported ones, before a venv or a resolver run).
PINS := $(PYTHON) lib/llava_gguf/run/platform_pins.py
$(STAMP): requirements.txt pyproject.toml $(wildcard constraints/*.txt)
	@$(PINS) constraints-file >/dev/null
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c "$$($(PINS) constraints-file)"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

constraints: $(STAMP) ## regenerate constraints/*.txt from requirements.txt with uv (TORCH_FIND_LINKS=<folder with the torch CPU wheel>)
	$(PY) -m pip install --quiet uv==0.13.9
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) lib/llava_gguf/run/platform_pins.py compile $(if $(TORCH_FIND_LINKS),--torch-find-links "$(TORCH_FIND_LINKS)",)

llama-cpp: $(STAMP) ## build the pinned, patched llama.cpp tools into ~/.cache/llava-gguf (skipped with LLAMA_CPP_DIR)
	$(PY) -m llava_gguf build-llama-cpp

llama-cpp-unpatched: $(STAMP) ## build llama-mtmd-cli from the pinned source without the patches (07_tune's published-recipe baseline)
	$(PY) -m llava_gguf build-llama-cpp --unpatched

# Rebasing onto another llama.cpp: which patches and hunks still apply (the tree is never written to).
patch-check: setup ## per patch and hunk, which of patches/llama.cpp apply to LLAMA_CPP_SRC=<llama.cpp tree> (default: the pinned source)
	$(PY) -m llava_gguf patches check $(if $(LLAMA_CPP_SRC),--tree "$(LLAMA_CPP_SRC)",)

all: check-params setup llama-cpp ## run every step on PARAMS, then render reports into outputs/<run>/reports/
	$(PY) -m llava_gguf run all --params "$(PARAMS)" $(FORCE_FLAG)

$(STEPS): check-params setup
	@if $(REGISTRY) uses-llama-cpp $@; then $(MAKE) --no-print-directory llama-cpp; fi
	$(PY) -m llava_gguf run $@ --params "$(PARAMS)" $(FORCE_FLAG)

report: setup ## re-render the HTML reports of PARAMS' run
	$(PY) -m llava_gguf report --params "$(PARAMS)"

compare: setup ## one page comparing run folders: make compare RUNS="outputs/o6 outputs/pi5" [OUT=page.html] (no RUNS: all, into outputs/index.html)
	$(PY) -m llava_gguf compare $(RUNS) $(if $(OUT),--out $(OUT),)

publish: setup ## model card into outputs/<run>/publish/README.md; UPLOAD=1 uploads to params publish.repo (token: HF_TOKEN / MODELSCOPE_API_TOKEN)
	$(PY) -m llava_gguf publish --params "$(PARAMS)" $(if $(filter 1 yes true,$(UPLOAD)),--upload,)

# JupyterLab refuses to start as root without --allow-root (a board's default login often is root).
lab: setup ## open JupyterLab on notebooks/, reading PARAMS; LAB_ARGS="--no-browser --port 8890" passes options through
	LLAVA_GGUF_PARAMS="$(abspath $(PARAMS))" $(VENV)/bin/jupyter lab notebooks/ \
	  $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)

# The page is plain static files that serve-llava.sh passes to llama-server with --path when they are
# there (lib/llava_gguf/llama_cpp/webui.py); the server's API works without them.
webui: setup ## build llama-server's chat page (npm ci + vite build, ~4 min on 2 cores) into ~/.cache/llava-gguf/llama-ui-<commit>/
	$(PY) -m llava_gguf build-webui

# Where npm is there, the page is built first (once; a failed build leaves the API serving).
serve: setup ## llama-server with the run's recommended configuration (after make tune): 127.0.0.1:8080, HOST=/PORT= to change; ARGS= more options
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory webui || \
	  echo "serve: the chat page could not be built (see above); serving the API only"; fi
	HOST="$(HOST)" PORT="$(PORT)" $(PY) -m llava_gguf serve --params "$(PARAMS)" -- $(ARGS)

test: setup llama-cpp ## run the test suite (unit tests, notebooks with nbval, a papermill run on the tiny model)
	$(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

test-fast: setup ## tests that need no llama.cpp tools
	$(PY) -m pytest tests -m "not llama_cpp" -p no:cacheprovider

bench: setup llama-cpp ## 7B-scale conversion and inference benchmark into outputs/bench/ (not part of test)
	$(PY) -m llava_gguf bench --params params/bench.yaml

arm64-rehearsal: setup ## as root: make setup + make all in an emulated arm64 Debian 12 root (qemu-user; RECORD=1 updates tests/data/rehearsal/arm64.json, KEEP_CLONE=1 reuses its .venv, KEEP_RUN=1 also its run folder)
	$(PY) -m llava_gguf rehearse-arm64 $(if $(filter 1 yes true,$(RECORD)),--record,) $(if $(filter 1 yes true,$(KEEP_CLONE)),--keep-clone,) $(if $(filter 1 yes true,$(KEEP_RUN)),--keep-run,)

rehearsal-x86: PARAMS := params/rehearsal.yaml
rehearsal-x86: all ## the rehearsal's params on this machine, its summary into tests/data/rehearsal/x86_64.json (PARAMS=params/rehearsal.yaml)
	$(PY) -m llava_gguf repacks --params "$(PARAMS)"
	$(PY) -m llava_gguf report --params "$(PARAMS)"
	$(PY) -m llava_gguf crosscheck outputs/rehearsal --out tests/data/rehearsal/x86_64.json

clean-run: ## delete outputs/<run>/ of PARAMS
	LLAVA_GGUF_PARAMS="$(PARAMS)" $(PY) -c "import shutil; from llava_gguf.run import workspace as w; shutil.rmtree(w.open_run().dir)"
