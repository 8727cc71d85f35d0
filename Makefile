# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install vlmkit, run the main job on an embedded default
#   make test   create .venv, install vlmkit with its test extras, run the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-fast install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(INSTALLED): pyproject.toml scripts/install-torch.sh | $(PY)
	bash scripts/install-torch.sh $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m vlmkit.demo

test: $(INSTALLED)
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(INSTALLED)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
