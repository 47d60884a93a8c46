# The two commands a newcomer types: `make demo` and `make test`. Both create .venv with the pinned dependencies first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test test-e2e bench clean cluster cluster-stop results-proposals

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/python pipelines/demo.py --config conf/demo.yaml $(ARGS)

# Two tiers: `make test` (everything but the end-to-end tier; ~12 min on 2 cores) and `make test-e2e` (whole jobs with
# multi-worker training, node loss, the retraining scenarios, the documented cluster submit; ~20 min). CI runs both.
test: setup
	$(BIN)/python -m pytest -q -m "not e2e" $(ARGS)

test-e2e: setup
	$(BIN)/python -m pytest -q -m e2e $(ARGS)

bench: setup
	$(BIN)/python bench/proposals_throughput.py
	$(BIN)/python bench/shard_read.py
	$(BIN)/python bench/train_loader.py
	$(BIN)/python bench/train_loader.py --model hstn_cls
	$(BIN)/python bench/inference.py --kind all
	$(BIN)/python bench/inference.py --kind ffdnet --cpus-per-worker 1
	$(BIN)/python bench/generators.py --top-k 100 1000
	$(BIN)/python bench/stages.py
	for b in bench/ops/*.py; do $(BIN)/python $$b || exit 1; done

# docs/RESULTS.md's proposal tables: the generators first (the FFD-Net table refines the models they register)
results-proposals: setup
	$(BIN)/python pipelines/results.py --config conf/results/proposals.yaml
	$(BIN)/python pipelines/results.py --config conf/results/ffdnet.yaml

# A Ray head node on this machine for `ray job submit` (token authentication, jobs on .venv): see cluster/README.md
cluster: setup
	cluster/local.sh start

cluster-stop:
	cluster/local.sh stop

clean:
	rm -rf runs .pytest_cache
