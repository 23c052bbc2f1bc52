# The two commands of the README:
#   make quickstart   set up, then train the quickstart job locally (2 gloo processes, no cluster)
#   make test         set up, install the test tools (helm, Prometheus, kube-apiserver, ...), run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: quickstart test setup benchmark clean

# --system-site-packages reuses a torch that the machine already has; pip installs what is missing.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,nlp]'
	touch $@

setup: $(BIN)/.installed

quickstart: setup
	$(BIN)/kubetrain run quickstart -f examples/quickstart.yaml

# The virtualenv's bin on PATH: the tests find its tools (hadolint, kubetrain) as a user's shell would.
test: setup
	exports="$$(bash scripts/install-test-tools.sh)" && eval "$$exports" && \
		PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

benchmark: setup
	$(BIN)/python benchmarks/loop_vs_plain.py

clean:
	rm -rf $(VENV) .kubetrain .pytest_cache
