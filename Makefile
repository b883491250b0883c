# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_ZOO ?= zoo-demo

.PHONY: install demo test test-slow test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	@test -f $(DEMO_ZOO)/zoo.json || $(VENV)/bin/mergetune zoo build $(DEMO_ZOO) --preset demo
	$(VENV)/bin/mergetune run configs/demo.yaml

# The default suite (tiny models; minutes). pytest's exit code 5 means "no test collected".
test: install
	$(PY) -m pytest -m "not slow" -q --durations=10

# End-to-end tests on the demo-sized zoo; CI runs these too.
test-slow: install
	$(PY) -m pytest -m slow -q --durations=10; code=$$?; [ $$code -eq 0 ] || [ $$code -eq 5 ]

test-all: test test-slow

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
