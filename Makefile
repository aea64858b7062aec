# tars-operator: the conventional operator targets.
SHELL := /bin/bash
export TARS_CACHE ?= $(HOME)/.cache/tars-operator
export VENV ?= $(TARS_CACHE)/venv
# The limiter comparison's own venv: its contenders (openai, LiteLLM, ...) stay out of the dev lock.
BENCH_VENV ?= $(TARS_CACHE)/venv-bench
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup lock images demo bench bench-limiters bench-coldwarm test test-fast e2e lint typecheck crds install run helm-lint cluster-build cluster-up cluster-down cluster-env cluster-status bench-memory bench-agent-cpu bench-pickup bench-scale bench-keda

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: ## install system packages (apt) and the Python environment (in $(VENV))
	@if [ -z "$(TARS_E2E_KUBECONFIG)" ]; then bash hack/install-system-deps.sh; fi
	@bash hack/setup-venv.sh

lock: setup ## pin the Python dependencies with hashes: requirements-dev.lock and the images' locks (UPGRADE=1: newest allowed)
	@bash hack/lock.sh

images: setup ## build the node's container images into $(TARS_CACHE)/images, only what changed (NAMES="tars-agent ...")
	$(PY) -m tars_localcluster.images build $(NAMES)

bench: setup ## the limiter benchmark: naive retry vs shared limiter vs local limiters (~3 min; ARGS=--quick)
	$(PY) bench/limiter_bench.py $(ARGS)

bench-limiters: ## openai client, aiolimiter, limits, LiteLLM and ours against a strict upstream (~30 min on a busy 2-core machine; ARGS=--quick)
	@VENV=$(BENCH_VENV) LOCK=$(CURDIR)/bench/requirements.lock bash hack/setup-venv.sh
	$(BENCH_VENV)/bin/python bench/limiter_compare.py $(ARGS)

bench-coldwarm: cluster-up ## cold vs warm agents on the local cluster's real node (~2 min; ARGS=--rounds N)
	$(PY) bench/coldwarm.py $(ARGS)

bench-memory: setup ## agent RSS per in-flight streaming request, and a 30 min RSS soak (~32 min; ARGS=--soak-minutes N)
	$(PY) bench/agent_memory.py $(ARGS)

bench-agent-cpu: setup ## agent CPU per task and burst pickup on loopback (~2 min; ARGS=--baseline <checkout of another commit>)
	$(PY) bench/agent_cpu.py $(ARGS)

bench-pickup: cluster-up ## warm pickup at 45 tasks/s, a 300-task burst, cold path, pod overshoot, on the real node (~8 min)
	$(PY) bench/warm_pickup.py $(ARGS)

bench-scale: cluster-build ## the operator at 100 pools x 20 agents on kwok, in a network namespace of its own (~12 min; ARGS=--quick)
	$(PY) bench/operator_scale.py $(ARGS)

# Only this target builds KEDA (first time ~15-30 min on 2 cores) and its images.
bench-keda: cluster-up ## scale reaction: an AgentPool vs real KEDA v2.21 on the local cluster (~15 min; ARGS=--contenders ...)
	bash hack/build-keda.sh
	$(PY) bench/keda_vs_operator.py $(ARGS)

helm-lint: cluster-build ## helm lint --strict the chart
	$(TARS_CACHE)/bin/helm lint --strict helm/tars-operator --kube-version 1.37.0

lint: setup ## ruff (lint + format check)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup ## mypy --strict on the packages and the benchmarks
	$(VENV)/bin/mypy
	MYPYPATH=bench:agent_image:operator:localcluster:contract $(VENV)/bin/mypy --strict bench/*.py

test: lint typecheck cluster-build ## everything: lint, types, fast tests and e2e tests on the local cluster
	$(PY) -m pytest tests e2e $(PYTEST_ARGS)

test-fast: setup ## the fast tests only (no cluster)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# With TARS_E2E_KUBECONFIG (another cluster, e.g. kind) nothing of the local cluster is built.
e2e: setup $(if $(TARS_E2E_KUBECONFIG),,cluster-build) ## the e2e tests (start the local cluster unless one runs; TARS_E2E_KUBECONFIG=file: that cluster)
	$(PY) -m pytest e2e $(PYTEST_ARGS)

crds: setup ## regenerate crds/ from the operator's pydantic models
	$(PY) -m tars_operator.crd

# Without $$KUBECONFIG, these targets use the local cluster (its API server, Prometheus, Redis).
LOCAL_ENV = if [ -z "$$KUBECONFIG" ]; then eval "$$($(PY) -m tars_localcluster env)"; fi

install: setup ## apply the CRDs to the cluster in $$KUBECONFIG (default: the local cluster)
	@$(LOCAL_ENV); $(VENV)/bin/kubectl apply -f crds/ && \
	  $(VENV)/bin/kubectl wait --for=condition=Established crd/agentpools.tars.dev --timeout=60s

run: install ## run the operator locally against $$KUBECONFIG: same code and flags as in-cluster (ARGS=...)
	@$(LOCAL_ENV); exec $(VENV)/bin/tars-operator --lease-namespace default --log-format text $(ARGS)

cluster-build: setup ## build the cluster's binaries into $(TARS_CACHE)/bin (first time ~35 min on 2 cores)
	@bash localcluster/build.sh

demo: setup ## the main job: local cluster + operator + a pool of real agents working through a burst of tasks
	$(PY) -m tars_localcluster demo $(ARGS)

cluster-up: setup ## build (first time) and start the local cluster; idempotent
	$(PY) -m tars_localcluster up

cluster-down: ## stop the local cluster; nothing of the node is left on the machine
	@if [ -x $(PY) ]; then $(PY) -m tars_localcluster down; fi

cluster-env: ## print `export KUBECONFIG=...` for the local cluster
	@$(PY) -m tars_localcluster env

cluster-status: ## show which daemons of the local cluster run
	@$(PY) -m tars_localcluster status
