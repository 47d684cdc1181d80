# pacsnode: `make run` installs and starts the node; `make test` installs what the tests
# need and runs lint, types and the whole test suite. Both work on a fresh Debian/Ubuntu
# machine with Python 3.11 (as root they apt-get the system packages themselves).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml

RUN_DEBS := redis-server
TEST_DEBS := redis-server dcmtk dicom3tools orthanc invesalius-examples mricron-data chromium nodejs

.PHONY: run test install install-test system-deps-run system-deps-test viewer-deps lint clean

run: install system-deps-run
	$(BIN)/pacsnode run --config $(CONFIG)

test: install-test system-deps-test viewer-deps lint
	$(BIN)/pytest -n 2 -m "not serial"
	$(BIN)/pytest -m serial

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=25.1"
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e . --group dev

system-deps-run:
	@./scripts/system-deps.sh $(RUN_DEBS)

system-deps-test:
	@./scripts/system-deps.sh $(TEST_DEBS)

# The viewer harness (tests/viewer): cornerstone3D at the versions OHIF pins and the
# latest 5.x, esbuild and puppeteer-core, exactly as the lock files say.
viewer-deps:
	@# Debian's nodejs comes without npm (a separate package); NodeSource's includes it.
	@command -v npm >/dev/null || ./scripts/system-deps.sh npm
	@for dir in tests/viewer tests/viewer/cs-5.6.8 tests/viewer/cs-5.14.0; do \
		(cd $$dir && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) || exit 1; \
	done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info tests/viewer/node_modules tests/viewer/cs-*/node_modules
