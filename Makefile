# Two commands on a fresh machine:  make demo  (the pump, CSV files under ./analytics-data)
#                                   make test  (everything CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo run test lint servers servers-stop bench bench-charts soak fuzz flower-screenshots

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The pump on the embedded default config (Redis on 127.0.0.1:6379, one CSV pump writing under
# ./analytics-data), fed by a demo producer. Ctrl+C stops it.
demo: install
	$(BIN)/iam-pump run --demo

# The pump on your own config: make run CONFIG=iam-pump.yaml
run: install
	$(BIN)/iam-pump run --config $(CONFIG)

# Stand-in MongoDB and Elasticsearch servers for the store tests (see scripts/test-servers.sh).
servers:
	scripts/test-servers.sh install
	scripts/test-servers.sh start

servers-stop:
	scripts/test-servers.sh stop

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: install servers lint
	$(BIN)/python -m pytest

# Every fuzz harness (fuzz/) for FUZZ_SECONDS each; inputs it finds and crashes go under .fuzz/.
FUZZ_SECONDS ?= 120
fuzz: install
	$(BIN)/python -m fuzz.campaign --seconds $(FUZZ_SECONDS)

# Benchmarks (bench/README.md); wrk comes from Debian (apt-get install wrk).
bench: install servers
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run_all.py

# The charts of docs/bench/ from one real run: every benchmark (quick durations unless
# BENCH_ARGS is set otherwise), its rows kept in bench/results.json, then bench/charts.py.
BENCH_ARGS ?= --quick
bench-charts: install servers
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	-$(BIN)/python bench/run_all.py $(BENCH_ARGS) --save bench/results.json
	$(BIN)/python bench/charts.py bench/results.json --out docs/bench

# Redis SIGKILLed and restarted (AOF, fsync always) many times under load: zero lost each time.
SOAK_LOOPS ?= 20
soak: install
	IAM_PUMP_SOAK_LOOPS=$(SOAK_LOOPS) $(BIN)/python -m pytest -s \
		tests/faults/test_lost_messages.py -k sigkilled

# The README's pictures of Flower (docs/flower-*.png): a Redis, workers and Flower of its own,
# photographed by Debian's headless Chromium (scripts/test-servers.sh install brings it).
flower-screenshots: install
	$(BIN)/python scripts/flower-screenshots.py --out docs
