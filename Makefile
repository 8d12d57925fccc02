# Two entry points: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3
# A CPU torch where none is installed (a bare `torch` requirement can pull a multi-GB CUDA
# build); an existing torch, CUDA or not, is kept.
TORCH_FALLBACK ?= torch==2.13.0

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_FALLBACK)"
	@$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m eplb_triton demo

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m pytest bench/ --benchmark-only -q
