# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Written after `npm ci` of the Element-stack test client (see below).
ELEMENT_STAMP := tests/element/node_modules/.installed

.PHONY: run test bench system-deps lint clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

# Reinstall only when the dependencies change.
$(VENV)/.installed-%: pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet --editable '.[$*]'
	touch $@

run: $(VENV)/.installed-quickstart
	$(VPY) -m bridge.quickstart

system-deps:
	bash scripts/system-deps.sh

test: $(VENV)/.installed-test system-deps $(ELEMENT_STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# The Element-stack test client's npm packages, reinstalled only when the lockfile changes.
# Without npm the stamp stays missing and those tests skip (tests/element_client.py says why).
$(ELEMENT_STAMP): tests/element/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tests/element --no-audit --no-fund && touch $@; \
	else echo "npm not found: the Element-stack tests will be skipped"; fi

# Performance is measured here, as ratios against a baseline in the same run; never in tests.
# One fresh Synapse for every measure; writes bench/results/{results.json,summary.md,bench.png}.
# BENCH_ARGS e.g. "-n 200 --mc-n 100 --duration 30 --ghosts 300" (python -m bench.report -h).
MC_VENV := bench/build/mc-venv
bench: $(VENV)/.installed-test $(VENV)/.installed-bench $(MC_VENV)/.installed
	$(VPY) -m bench.report $(BENCH_ARGS)

# matrix-commander, the comparison a user would make today, in a venv of its own: its
# dependencies never touch ours.
$(MC_VENV)/.installed:
	$(PYTHON) -m venv $(MC_VENV)
	$(MC_VENV)/bin/pip install --quiet matrix-commander==8.0.6
	touch $@

lint: $(VENV)/.installed-test
	$(VPY) -m pip install --quiet ruff
	$(VPY) -m ruff check bridge tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
