# Two entry points: `make demo` and `make test`. Both install what is missing first, and only that:
# a stamp under build/ remembers an install for this Python environment and this pyproject.toml,
# so a second `make demo` starts the demo at once (it reinstalls after pyproject.toml changes, in
# another venv, or when the package or an extra went missing).
PYTHON ?= python3
# Where no torch is installed: torch==$(TORCH_VERSION) from pip's configured index first (a CPU
# build where that index serves one, e.g. a local wheel mirror; on Linux, PyPI's default wheel is
# the CUDA build, which also runs on CPU but is large); if that fails, the CPU-only build from
# the PyTorch CPU wheel index. `make demo TORCH_INDEX=$(TORCH_CPU_INDEX)` takes the CPU build
# from there directly (a machine without a GPU, avoiding the CUDA download). An existing torch,
# CUDA or not, is always kept.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
EXTRAS ?= cli,test

# What an install depends on: this interpreter's environment, pyproject.toml, the extras, and the
# editable install still pointing at this checkout. Fails (-> "missing") when any is not in place.
INSTALL_KEY_PY := import hashlib, json, os, sys; sys.path.remove(''); from importlib import metadata as m; \
  url = json.loads(m.distribution('eplb-triton').read_text('direct_url.json') or '{}').get('url', ''); \
  assert os.path.realpath(url.replace('file://', '', 1)) == os.path.realpath('.'), 'installed from elsewhere'; \
  [m.version(n) for n in ('torch', 'tqdm', 'pytest', 'hypothesis', 'pytest-benchmark')]; \
  print(hashlib.sha1(sys.prefix.encode() + open('pyproject.toml', 'rb').read() + b'$(EXTRAS)').hexdigest()[:16])
INSTALL_KEY := $(shell $(PYTHON) -c "$(INSTALL_KEY_PY)" 2>/dev/null || echo missing)
STAMP := build/.installed-$(INSTALL_KEY)

.PHONY: install demo test bench

install: $(STAMP)

$(STAMP):
	@$(PYTHON) -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"
	@mkdir -p build && rm -f build/.installed-*
	@key=$$($(PYTHON) -c "$(INSTALL_KEY_PY)" 2>/dev/null) && touch "build/.installed-$$key" || true

.PHONY: torch
torch:
ifeq ($(TORCH_INDEX),)
	$(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)" \
	  || $(PYTHON) -m pip install -q --index-url "$(TORCH_CPU_INDEX)" "torch==$(TORCH_VERSION)"
else
	$(PYTHON) -m pip install -q --index-url "$(TORCH_INDEX)" "torch==$(TORCH_VERSION)"
endif

demo: install
	$(PYTHON) -m eplb_triton demo

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m pytest bench/ --benchmark-only -q
