# Two entry points, each self-contained on a fresh CPU machine:
#   make demo   set up .venv and build the quickstart recipe (SmolLM2-135M-Instruct -> INT8, gated)
#   make test   set up .venv and run the test suite (unit + end-to-end on the real model)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.optforge-installed

.PHONY: venv demo test test-fast cpp clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/dev.txt requirements/data.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements/data.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: venv
	$(VENV)/bin/optforge build recipes/quickstart.yaml

test: venv cpp
	$(PY) -m pytest -q

# The C++ runtime (runtime/cpp): library, optforge-rt, the Python module, then its ctest suite.
CPP_BUILD := runtime/cpp/build
cpp: venv
	cmake -S runtime/cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir)
	cmake --build $(CPP_BUILD) -j2
	cd $(CPP_BUILD) && ctest --output-on-failure

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build .pytest_cache
