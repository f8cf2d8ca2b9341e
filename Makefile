# The two entry points of README.md: `make run` starts a node, `make test` passes the suite.
# Both create their own virtual environment in .venv, so a fresh machine needs only python3.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test lint typecheck unit bench clean browser

run: $(VENV)/.installed
	@# Bytecode for our own modules, even where PYTHONDONTWRITEBYTECODE is set: it halves start-up.
	@$(BIN)/python -m compileall -q irisnode overlay relay
	$(BIN)/irisnode $(ARGS)

test: $(VENV)/.installed-test lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

bench: $(VENV)/.installed
	@$(BIN)/python -m compileall -q irisnode overlay relay
	$(BIN)/python -m bench $(ARGS)

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Debian's chromium and chromedriver for the status page's browser test (which skips
# without them). Installs only what is missing, and only as root (CI runs as root).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver are installed"; \
	elif [ "$$(id -u)" -ne 0 ]; then \
		echo "not root: skipping chromium; the browser test will be skipped" >&2; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
