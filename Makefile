# dgemma — the two set-up commands:  `make demo`  and  `make test`.
# Both create .venv if it is missing. Torch is installed only when the venv lacks it (TORCH selects the wheel;
# on a CUDA machine with torch already installed system-wide, create the venv yourself or set TORCH).

PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := demo-model

.PHONY: demo demo-text test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --disable-pip-version-check -q "$(TORCH)"
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --disable-pip-version-check -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The demo: the shipped Sudoku model (src/dgemma/assets/sudoku/diffusion) solves a 30-clue puzzle live: clues in
# bold, digits accepted this step in green, drafts dim, noise as dots; the checked grid at the end.
# `make demo-text` watches a tiny random checkpoint denoise text (random weights: it converges to noise).
DEMO_PUZZLE := 036000800100900007200801503014007030700000010500000402602000350040602700800009000

demo: $(VENV)/.installed
	$(BIN)/dgemma sudoku solve $(DEMO_PUZZLE) --watch

demo-text: $(VENV)/.installed
	@test -f $(DEMO)/config.json || $(BIN)/dgemma init --preset tiny $(DEMO)
	$(BIN)/dgemma generate --model $(DEMO) --chat --watch --seed 0 --max-new-tokens 64 \
		"Write a haiku about diffusion."

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
