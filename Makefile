# Each target creates its own virtual environment on first use and installs what it needs into it.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build where a CPU build is at hand.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0
TRANSFORMERS ?= 5.23.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-quick lint docs docs-check bench clean

$(BIN)/attnlens: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH)"
	$(BIN)/python -m pip install --quiet "transformers==$(TRANSFORMERS)" -e ".[dev,viz]"
	touch $(BIN)/attnlens

demo: $(BIN)/attnlens  ## the GPT-2 weight walk-through, then verify and head scores on the embedded demo model
	$(BIN)/attnlens weights --gpt2-small
	$(BIN)/attnlens verify
	$(BIN)/attnlens heads

test: $(BIN)/attnlens  ## the whole test suite: about 5 minutes on 2 cores, once the environment exists
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: $(BIN)/attnlens  ## the suite without the tests marked slow: about 1 minute on 2 cores
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(BIN)/attnlens
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# The notebooks (tutorials, gallery) are executed by the build: offline, and without progress bars in their outputs.
DOCS_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS="ignore:IProgress not found"
SCREENSHOTS ?= /tmp/attnlens-site-screenshots

docs: $(BIN)/attnlens  ## the site in site/, with the notebooks executed (a failing cell fails the build)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	$(DOCS_ENV) $(BIN)/mkdocs build --strict

docs-check: $(BIN)/attnlens  ## after `make docs`: open the notebook pages of site/ in headless Chromium, screenshots to SCREENSHOTS
	$(BIN)/python docs/check_site.py site --screenshots $(SCREENSHOTS)

bench: $(BIN)/attnlens  ## side-by-side benchmarks against HF, TransformerLens and nnsight (not part of the tests)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .venv-* site build *.egg-info
