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

# Python 3.12 is the interpreter of current 3D Slicer (5.12 and the Preview). `make test` also runs the
# tests of everything that runs in Slicer's own process (tests/test_extension.py, test_runner.py,
# test_mrml.py, test_io.py) in a second venv under Python 3.12 WITHOUT torch: as in a fresh Slicer, whose
# process must never import it (the tests that run a model skip there, saying so). torch is left out
# also because no CPU build of it for 3.12 is reachable here: PyPI's Linux wheel is the CUDA build
# (527 MB plus several GB of NVIDIA libraries). PYTHON312= (empty) skips this part.
PYTHON312 ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
                 /usr/local/bin/python3.12 /usr/bin/python3.12,$(shell $(p) -c 'import sys; \
                 print("$(p)" if sys.version_info[:2] == (3, 12) else "")' 2>/dev/null)))
VENV312   := .venv-py312
GUI_TESTS := tests/test_extension.py tests/test_runner.py tests/test_mrml.py tests/test_io.py

.PHONY: demo test test-py312 bench clean-venv dicom3tools

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
	$(MAKE) --no-print-directory test-py312

$(VENV312)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip
	$(VENV312)/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	    print("\n".join(d for d in p["dependencies"] + p["optional-dependencies"]["test"] if not d.startswith("torch")))' \
	    > $(VENV312)/requirements-without-torch.txt
	$(VENV312)/bin/python -m pip install --quiet -r $(VENV312)/requirements-without-torch.txt
	$(VENV312)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-py312:
ifeq ($(strip $(PYTHON312)),)
	@echo "make test: no Python 3.12 found (set PYTHON312=...): the Python 3.12 run of $(GUI_TESTS) was NOT done"
else
	@$(MAKE) --no-print-directory $(VENV312)/.installed
	@echo "Python 3.12, without torch (Slicer's own process): $(GUI_TESTS)"
	$(VENV312)/bin/python -m pytest -q $(GUI_TESTS)
endif

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_standardize.py

clean-venv:
	rm -rf $(VENV) $(VENV312)
