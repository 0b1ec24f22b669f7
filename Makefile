# Two set-up commands: `make demo` and `make test` (README). Both create .venv if absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded data: baselines, then the chain, then the Table-2 report.
# Interrupt it at any point and run it again: finished members are skipped, the rest resume.
demo: $(STAMP)
	$(VENV)/bin/compt chain run configs/demo.yaml --individual
	$(VENV)/bin/compt chain run configs/demo.yaml
	$(VENV)/bin/compt report runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
