# Two entry points for a fresh machine: `make demo` and `make test` (`make test-fast`: without
# the tests marked slow: real models, downloads, TVM, plugin installs, Node, fresh venvs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[compile,dev,search]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m kiln.demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow" -n auto

clean:
	rm -rf $(VENV) artifacts .pytest_cache
