# Two commands set up everything on a fresh machine:
#   make run    installs into .venv and runs the main job on the offline default (scikit-learn digits;
#               two worker processes share the study: on 2 cores 1.75x one process with two threads), then
#               writes its report page and prints where
#   make test   installs into .venv (with the dev extra) and runs the test suite
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test bench

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) search/run.py --space spaces/lambda_decay.yaml --workers 2
	$(PY) -m search.cli report --study lambda_decay

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --maxschedchunk 1

bench: $(STAMP)
	$(PY) benchmarks/shortcut_heads.py

# make docs   regenerates the reference pages from the code and builds the site into site/ (mkdocs-material)
.PHONY: docs
docs: $(STAMP)
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# make gpu-check   the GPU checks in one process, at most 8 minutes on one H100/H200 (benchmarks/gpu.py):
#                  benchmarks/results/<date>-<gpu>.json, then docs/benchmarks/gpu.md regenerated from it
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu.py --budget-s 480
	$(PY) docs/gen_reference.py
