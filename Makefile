# The two commands a new user needs: `make run` (start everything) and `make test` (the fast suite).
# Both create the virtualenv .venv and install the pinned requirements when missing or changed.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-dev.txt 2>/dev/null | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(REQ_HASH)
PYTEST_ARGS ?=

.PHONY: help venv run test test-postgres lint typecheck format check e2e real-backend-start real-backend-stop bench bench-quick bench-scaling bench-prefix clean browser docs-screenshots

help:
	@echo "make run        start web + worker + beat + demo backend (http://127.0.0.1:$${PORT:-8000})"
	@echo "make test       the fast mock suite (no network, no real backend)"
	@echo "make e2e        start a real CPU vLLM pool, run the E2E suite through the platform, stop it"
	@echo "make lint       ruff, Django checks, import layers and mypy (docs/architecture.md)"
	@echo "make browser    the admin in Debian's Chromium through Playwright (docs/operations.md)"
	@echo "make typecheck  mypy with django-stubs and djangorestframework-stubs"

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

run: venv
	$(PY) scripts/run_platform.py

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The admin in Debian's Chromium (Playwright): installs Chromium when missing (root), then runs the browser tests
# (they are in `make test` too, skipped there when Chromium is missing).
browser: venv
	bash scripts/ensure_chromium.sh
	BROWSER_TESTS_REQUIRED=1 $(PY) -m pytest -m browser $(PYTEST_ARGS)

# Retake the screenshots docs/operations.md shows (docs/img/) with the browser test.
docs-screenshots: venv
	bash scripts/ensure_chromium.sh
	DOCS_SCREENSHOTS=1 BROWSER_TESTS_REQUIRED=1 $(PY) -m pytest -m browser $(PYTEST_ARGS)

test-postgres: venv
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test} $(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# mypy with the Django and DRF plugins on the whole project (docs/architecture.md "Types").
typecheck: venv
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

real-backend-start:
	bash scripts/real_backend.sh start

real-backend-stop:
	bash scripts/real_backend.sh stop

e2e: venv
	bash scripts/e2e.sh

bench: venv
	$(PY) bench/run.py
	$(PY) bench/overload.py
	$(PY) bench/fairness.py

bench-quick: venv
	$(PY) bench/run.py --quick

# Prefix-cache routing (issue 13): the CPU vLLM pool of scripts/real_backend.sh (started if not up) and vllm-router
# (installed on first use in its own venv); 1-1.5 h on a shared machine. BENCH_PREFIX_ARGS=--quick (1 short round) or --mock.
bench-prefix: venv
	$(PY) bench/prefix.py $(BENCH_PREFIX_ARGS)

# Worker scaling (root: each worker on its own CPU cgroup); see docs/performance.md "Several workers".
bench-scaling: venv
	$(PY) bench/scaling.py

# Production web server (scripts/serve.sh: collectstatic, then uvicorn with WEB_CONCURRENCY workers and a graceful
# shutdown of GRACEFUL_TIMEOUT_S); settings from the environment, e.g. DJANGO_DEBUG=0 (docs/deploy.md).
serve: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/serve.sh

# Fault injection across network namespaces (root): blackholed backend, latency and loss, Redis partition, a backend
# that stops reading; about 2.5 minutes (docs/testing.md "Fault injection").
faults: venv
	PY=$(PY) bash scripts/faults.sh

.PHONY: faults

# The image of deploy/Dockerfile built with podman on a local Debian base and run here (root): migrate, web with two
# workers, worker, beat, SDK smoke checks, SIGTERM during a stream (docs/deploy.md "Container image").
container-smoke: venv
	PY=$(PY) bash scripts/container_smoke.sh

.PHONY: container-smoke

# Fuzz every operation of /api/schema/ against a live server (fixed seed, bounded); fails on any 5xx (docs/testing.md).
schemathesis: venv
	PYTHON=$(PY) bash scripts/schemathesis.sh

.PHONY: schemathesis

# Lint and schema-validate deploy/ (compose file, Kubernetes overlays) without a container engine or a cluster.
validate-deploy: venv
	VENV_BIN=$(VENV)/bin bash scripts/validate_deploy.sh

.PHONY: serve validate-deploy

clean:
	rm -rf $(VENV) .local staticfiles .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
