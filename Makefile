# The two commands a newcomer needs are `make demo` and `make test`; both set up
# everything they use from this repository's own files.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo serve test lint generate check-generated bench router-artefact cache-model cache-lodo cache-eval workload clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch node_modules/.installed

## The case study: the mesh in process, the bundled support workload replayed under
## the baseline and the optimised policy, the savings report (offline, simulated).
demo: $(STAMP)
	$(BIN)/costmesh demo

## Run all four services in one process on the embedded defaults (port 50051).
serve: $(STAMP)
	$(BIN)/costmesh serve

## Regenerate the Python code of the protos (commit the result).
generate: $(STAMP)
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/python scripts/gen_config_doc.py

## Fail when the committed generated code differs from what the protos produce.
check-generated: generate
	@git diff --exit-code --stat -- protos docs/configuration.md || (echo "generated code drifted: run 'make generate' and commit" && exit 1)
	@test -z "$$(git status --porcelain --untracked-files=all -- protos)" || (git status --short -- protos; echo "untracked generated files: run 'make generate' and commit"; exit 1)

## Proto lint (buf STANDARD + COMMENTS), Python lint, format and types.
lint: $(STAMP) node_modules/.installed
	npx --no-install buf lint
	npx --no-install buf format -d --exit-code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Everything CI checks: lint, generated-code drift, the whole test suite.
test: lint check-generated
	$(BIN)/python -m pytest

## Benchmarks, run on demand (not part of the test suite).
bench: $(STAMP)
	$(BIN)/python bench/cache_hit_latency.py
	$(BIN)/python bench/semantic_lookup.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/route_latency.py
	$(BIN)/python bench/dispatch.py overhead
	$(BIN)/python bench/dispatch.py flaky
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/embedding_cpu.py threads

## Retrain the cache's equivalence model that ships with costmesh (about 20 minutes on
## 2 cores; Banking77, CLINC150 and Bitext beside the checkout), then the router
## artefact, which is trained on that model's vectors.
cache-model: $(STAMP)
	$(BIN)/costmesh cache train --data banking77,clinc150,bitext --seed 0 --out services/common/embedding_model
	$(MAKE) router-artefact

## The three leave-one-dataset-out models `cache eval --setting lodo` measures.
LODO := .costmesh/lodo
cache-lodo: $(STAMP)
	$(BIN)/costmesh cache train --data clinc150,bitext --out $(LODO)/without-banking77
	$(BIN)/costmesh cache train --data banking77,bitext --out $(LODO)/without-clinc150
	$(BIN)/costmesh cache train --data banking77,clinc150 --out $(LODO)/without-bitext

## The shipped model beside stock MiniLM, in-domain and leave-one-dataset-out.
cache-eval: $(STAMP)
	$(BIN)/costmesh cache eval --setting both --lodo-dir $(LODO) --format markdown

## Retrain the router artefact that ships with costmesh (Bitext and Banking77 support tickets).
router-artefact: $(STAMP)
	$(BIN)/costmesh router train --data bitext,banking77 --out services/router/support-tiers.npz

## Rebuild the case study's and the quality gate's workloads that ship with costmesh
## (Bitext's held-out tickets).
workload: $(STAMP)
	$(BIN)/costmesh workload generate --requests 1200 --seed 0 --out costmesh_tools/casestudy/support-workload.jsonl.gz
	$(BIN)/costmesh workload generate --requests 5000 --seed 1 --days 4 --out costmesh_tools/casestudy/support-eval.jsonl.gz

clean:
	rm -rf $(VENV) node_modules .costmesh costmesh-demo .test-artifacts
