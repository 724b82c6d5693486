# The two commands in the README: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install what they need, so they work from a clean clone.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test lint system-deps

$(BIN)/.medcap-installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and alone: pip takes the local CPU wheel, never a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

system-deps:
	bash scripts/install-system-deps.sh

demo: $(BIN)/.medcap-installed
	$(BIN)/medcap run --out runs/demo

lint: $(BIN)/.medcap-installed
	$(BIN)/ruff check medcap tests benchmarks
	$(BIN)/ruff format --check medcap tests benchmarks

# Two pytest workers (pytest-xdist), one test file each at a time: most tests compute on one thread,
# so on the 2-core reference machine the default run takes about half its serial time. More workers
# need more memory (the heaviest default tests take ~3 GB each): TEST_WORKERS=1 runs serially.
TEST_WORKERS ?= 2

test: $(BIN)/.medcap-installed system-deps lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25
