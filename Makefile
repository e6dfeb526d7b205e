# kubetune — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SRC := kubetune runtime/kubetune_runtime api/kubetune_api operator/kubetune_operator trainer-image/kubetune_trainer cli/kubetune_cli local/kubetune_local
PYTEST_ARGS ?=
# Where no function may be longer than 80 lines (`make lint`).
SHORT_FUNCTIONS := runtime/kubetune_runtime api/kubetune_api operator/kubetune_operator local/kubetune_local

.PHONY: help venv run demo test test-faults test-fast lint mypy format crds test-deps bench-api bench-operator bench-trainer gpu-smoke clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "kubetune needs Python 3.11 or newer"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[runtime,api,operator,local,dev,bench,trainer,tracking,cli]'
	@touch $@

venv: $(STAMP) ## Create the virtualenv with everything the API, operator and tests need

run: $(STAMP) ## Start kubetune locally (API, jobs, trainer, vLLM; a CUDA GPU when listed); Ctrl-C stops it
	bash hack/install-vllm.sh
	PYTHON=$(PY) bash hack/install-trainer-gpu.sh
	$(PY) -m kubetune_local $(RUN_ARGS)

demo: $(STAMP) ## Fine-tune and chat with the OpenAI SDK against a running `make run`
	$(PY) examples/demo.py

test-deps: $(STAMP) ## Install etcd, build/cache kube-apiserver, fetch kubectl and helm
	PYTHON=$(PY) bash hack/install-test-deps.sh

test: test-deps ## Run the whole test suite (real apiserver, S3 server, ...)
	$(PY) -m pytest -n 2 --dist loadgroup --durations=30 $(PYTEST_ARGS)

test-faults: test-deps ## Fault injection at full size: ROUNDS (default 6) x 5 faults x 2 runtimes (60 faults); prints the tally
	KUBETUNE_FAULT_ROUNDS=$(or $(ROUNDS),6) KUBETUNE_FAULT_FIRST_ROUND=$(or $(FIRST_ROUND),0) \
		$(PY) -m pytest -n 2 tests/lifecycle/test_faults.py

test-fast: $(STAMP) ## Run the tests that need no cluster
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff, ruff format, mypy --strict, import-linter's contracts, function length
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) --no-print-directory mypy
	$(VENV)/bin/lint-imports
	$(PY) hack/check_function_length.py --max 80 $(SHORT_FUNCTIONS)

mypy: $(STAMP) ## mypy --strict over the packages, tests, benchmarks and hack/
	$(VENV)/bin/mypy $(SRC) tests benchmarks hack

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-api: test-deps ## Benchmark the API on both backends (writes benchmarks/results/api.json)
	$(PY) benchmarks/api_bench.py

bench-operator: test-deps ## 500 FineTuneJobs → PyTorchJobs: latency, RSS (writes benchmarks/results/operator.json)
	$(PY) benchmarks/operator_bench.py $(BENCH_ARGS)

bench-trainer: $(STAMP) ## Trainer throughput, stock TRL vs kubetune (SHAPE=8b on an H100; tiny on CPU)
	$(PY) benchmarks/trainer_throughput.py --shape $(or $(SHAPE),8b) $(BENCH_ARGS)

gpu-smoke: $(STAMP) ## The trainer's CUDA paths on one GPU, under 10 min (writes benchmarks/results/gpu-smoke.json); CPU cases only without one
	$(PY) hack/gpu_smoke.py --out benchmarks/results/gpu-smoke.json $(SMOKE_ARGS)

crds: $(STAMP) ## Regenerate the CRD YAML from the pydantic models
	$(PY) -m kubetune.crd > crds/finetunejobs.kubetune.io.yaml
	$(PY) -m kubetune.crd basemodel > crds/basemodels.kubetune.io.yaml
	cp crds/finetunejobs.kubetune.io.yaml charts/kubetune/crds/finetunejobs.kubetune.io.yaml
	cp crds/basemodels.kubetune.io.yaml charts/kubetune/crds/basemodels.kubetune.io.yaml
	cp crds/kopf-peering.yaml charts/kubetune/crds/kopfpeerings.kopf.dev.yaml

clean: ## Remove the virtualenv and caches kept in the repository
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
