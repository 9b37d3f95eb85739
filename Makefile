# Two commands for a newcomer: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
export BATCH_INFER_HOME ?= $(CURDIR)/.data
export BATCH_INFER_TRITON_ENV ?= $(BATCH_INFER_HOME)/triton-server-env

.PHONY: setup demo test lint unit docs bench bench-e2e bench-servers models llm-repository lock clean

# Both environments are byte-compiled once here (uv does not, and where PYTHONDONTWRITEBYTECODE is set
# nothing ever is): every Airflow task process, DAG parse and model stub then skips compiling its imports.
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip uv
	$(UV) pip install -q --compile-bytecode -p $(PY) -r requirements/lock.txt
	$(UV) pip install -q -p $(PY) --no-deps -e .
	$(PY) -m compileall -q airflow_batch_infer dags
	touch $@

# The local Triton runtime's own environment (nvidia-pytriton, numpy<2, onnxruntime), apart from ours.
$(BATCH_INFER_HOME)/.server-env-ready: $(VENV)/.installed airflow_batch_infer/runtimes/server-requirements.txt
	$(PY) -m airflow_batch_infer.runtimes.local prepare
	$(BATCH_INFER_TRITON_ENV)/bin/python -m compileall -q -j 0 $(BATCH_INFER_TRITON_ENV)/lib > /dev/null
	mkdir -p $(BATCH_INFER_HOME) && touch $@

$(AIRFLOW_HOME)/airflow.db: $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(VENV)/bin/airflow db migrate > $(AIRFLOW_HOME)/migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/migrate.log; exit 1)

setup: $(VENV)/.installed $(BATCH_INFER_HOME)/.server-env-ready $(AIRFLOW_HOME)/airflow.db

demo: setup
	$(PY) scripts/run_demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(VENV)/bin/pytest -ra

unit: $(VENV)/.installed
	$(VENV)/bin/pytest -ra tests/unit

# The docs site (mkdocs.yml, docs/) into site/, strictly: a broken link, include or docstring fails it.
# NO_MKDOCS_2_WARNING silences the banner Material prints on every build (its end of life in May 2027, and
# Zensical, its successor, which reads the same mkdocs.yml): a notice about the tool, not about these docs.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	$(PY) benchmarks/throughput.py

# The whole DAG (dags test and a LocalExecutor scheduler) beside Ray Data and a naive loop; BENCH_ROWS rows,
# BENCH_ARGS=--large for the large run (the DAG under the scheduler on 100 M rows too).
bench-e2e: setup
	$(PY) benchmarks/e2e.py $(BENCH_ARGS)

# The infer phase over 1 and 2 local servers, side by side (BENCH_ARGS: --rows, --servers, --model).
bench-servers: setup
	$(PY) benchmarks/servers.py $(BENCH_ARGS)

# Rebuild the ONNX models in triton_models/ from their fixed seeds.
models: $(VENV)/.installed
	$(PY) scripts/build_models.py

# The TensorRT-LLM model repository to serve, filled from triton_models/llm/templates (the only copy in git):
# engine and tokenizer folders as the server sees them; LLM_ARGS for more of the script's flags.
LLM_ENGINE_DIR ?= /engines/llm
LLM_TOKENIZER_DIR ?= /tokenizer
LLM_REPOSITORY ?= triton_models/llm/repository
llm-repository:
	$(PYTHON) scripts/fill_llm_repository.py --engine-dir $(LLM_ENGINE_DIR) --tokenizer-dir $(LLM_TOKENIZER_DIR) \
		--max-batch-size 256 --kv-cache-fraction 0.9 --output $(LLM_REPOSITORY) $(LLM_ARGS)

# Refresh the pinned sets after changing pyproject.toml: every extra and the dev group (test tools), so that
# `make setup` installs all of them.
lock: $(VENV)/.installed
	$(UV) pip compile -q -p $(PY) pyproject.toml --all-extras --group dev -o requirements/lock.txt --no-header --annotation-style line

clean:
	rm -rf $(VENV) $(AIRFLOW_HOME) $(BATCH_INFER_HOME) .bench site
