# Two commands do all set-up: `make demo` and `make test`. Each creates .venv/ if missing and installs
# the project into it (editable) with its dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch. On this project's machines `pip install torch==2.13.0` finds it locally;
# elsewhere pip fetches it from PyPI (on Linux that is the CUDA build; set TORCH_PIP_ARGS to use
# PyTorch's own CPU wheel index instead).
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test bench clean-venv dicom3tools

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 12) else "Python 3.10-3.12 is required, found %d.%d (set PYTHON=python3.11)" % v)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@$(MAKE) --no-print-directory dicom3tools
	touch $@

# dciodvfy (Debian's dicom3tools) checks the DICOM the tests write; installed where this runs as root with
# apt-get, else its tests are skipped with a reason. Never fails the set-up.
dicom3tools:
	@command -v dciodvfy >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq dicom3tools >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dicom3tools >/dev/null 2>&1; }; }; } || \
	  echo "note: dciodvfy (dicom3tools) is not installed; the DICOM conformance tests will be skipped"

demo: $(VENV)/.installed
	$(BIN)/ltdiffpp demo --out demo-output

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_standardize.py

clean-venv:
	rm -rf $(VENV)
