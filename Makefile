# QuantScope. Both main targets do their own setup (scripts/setup.sh is idempotent and quick once done).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test bench

setup:
	bash scripts/setup.sh

run: setup
	$(PY) app.py

test:
	bash scripts/setup.sh --test
	$(PY) -m pytest $(PYTEST_ARGS)

# Every bench/bench_*.py prints ratios measured in one run (see docs/benchmarks.md).
bench: setup
	@set -e; found=0; for f in bench/bench_*.py; do \
	  [ -f "$$f" ] || continue; found=1; echo "== $$f"; $(PY) "$$f"; \
	done; [ $$found = 1 ] || echo "no benchmarks in bench/ yet"
