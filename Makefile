# Two commands: `make run` sets up and runs the daemon; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SITE   ?= site
DOMAIN ?= ask.example


.PHONY: test-postgresql
.PHONY: run test setup demo check clean corpus-report messages bench bytecode

$(BIN)/mailflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/mailflow

$(SITE)/config.toml: | $(BIN)/mailflow
	$(BIN)/mailflow init $(SITE) --domain $(DOMAIN)

## run: make a site in ./site (once) and run the daemon on 127.0.0.1:2525
run: $(BIN)/mailflow $(SITE)/config.toml
	$(BIN)/mailflow --config $(SITE)/config.toml serve

## demo: with `make run` going in another terminal, watch a request go round
demo: $(BIN)/mailflow
	$(BIN)/mailflow --config $(SITE)/config.toml demo

## test: the whole suite, every site-based test on SQLite and on PostgreSQL, in parallel workers
## (most of a test's time is waiting on a daemon or a subprocess; TEST_WORKERS=0 runs them in turn)
TEST_WORKERS ?= 4
test: $(BIN)/mailflow bytecode
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

## bytecode: compile mailflow's modules once, as an installed package has them. Where
## PYTHONDONTWRITEBYTECODE is set (it is on some CI machines), every daemon, CLI subprocess and
## benchmark would otherwise compile ~90 modules from source at each start (about 0.3 s of CPU).
bytecode: $(BIN)/mailflow
	$(BIN)/python -m compileall -q mailflow bench

## test-postgresql: only the PostgreSQL side of the site-based tests
test-postgresql: $(BIN)/mailflow bytecode
	MAILFLOW_TEST_DATABASES=postgresql $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

## bench: the performance benchmarks (bench/README.md); `make bench ARGS=--quick` for tiny sizes
bench: $(BIN)/mailflow bytecode
	$(BIN)/python -m bench $(ARGS)

## corpus-report: classification accuracy over tests/corpus, written to tests/corpus-report.md
corpus-report: $(BIN)/mailflow
	$(BIN)/python tests/corpus_report.py

## check: the shared acceptance check
check: $(BIN)/mailflow
	$(BIN)/python ../shared/checks/round-trip

clean:
	rm -rf $(VENV) .pytest_cache

## messages: re-extract translatable text into mailflow/locale/mailflow.pot and update catalogues
messages: $(BIN)/mailflow
	$(BIN)/pybabel extract -F babel.cfg -k _ -k N_ --no-location --sort-output -o mailflow/locale/mailflow.pot .
	$(BIN)/pybabel update -i mailflow/locale/mailflow.pot -d mailflow/locale -D mailflow --no-fuzzy-matching
