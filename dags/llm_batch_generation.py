"""Summarise a table of documents with an LLM on Triton, one summary per document, into the warehouse.

documents → stage → generate (one mapped task per chunk: prompts from a template, many requests in flight,
tokens/s in the log) → persist (``document_summaries``; documents whose prompt the model refuses, too long
say, go to ``document_summaries_rejects`` with the server's message).

Embedded default: a local ``tritonserver`` serving ``llm_stand_in``, a CPU stand-in with the TensorRT-LLM
ensemble's tensors and deterministic text, started for the run and stopped after it. On a GPU server with
the real ensemble (``make llm-repository`` fills ``triton_models/llm/repository`` from the templates, see
docs/how-to/llm-generation.md), only the model name and the endpoint change: set
``BATCH_INFER_LLM_CONN_ID`` to a ``triton`` connection (host, gRPC port) where the scheduler and workers
parse this file, and trigger with ``{"model_name": "ensemble"}``; the DAG then has no start and stop tasks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task
from llm_documents import DOCUMENTS_PATH, PROMPT_TEMPLATE, write_documents

from airflow_batch_infer.operators.generate import TritonGenerateOperator
from airflow_batch_infer.operators.persist import PersistOutputsOperator
from airflow_batch_infer.operators.server import StartTritonServerOperator, StopTritonServerOperator
from airflow_batch_infer.operators.stage import StageInputsOperator
from airflow_batch_infer.paths import batch_infer_home

REPOSITORY = Path(__file__).resolve().parent.parent / "triton_models"
#: A ``triton`` connection to a server that is already running (a GPU server with the TensorRT-LLM
#: ensemble); unset: the run starts a local server for itself.
SERVER_CONN_ID = os.environ.get("BATCH_INFER_LLM_CONN_ID") or None
DEFAULT_MODEL = os.environ.get("BATCH_INFER_LLM_MODEL") or ("ensemble" if SERVER_CONN_ID else "llm_stand_in")

with DAG(
    dag_id="llm_batch_generation",
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["demo", "triton", "llm"],
    params={
        "model_name": Param(DEFAULT_MODEL, type="string", description="llm_stand_in here; ensemble on GPU."),
        "input_path": Param(
            None,
            type=["null", "string"],
            description="Parquet file or folder with doc_id, title, body. Empty: generate demo documents.",
        ),
        "documents": Param(3_000, type="integer", minimum=1, description="Demo documents to generate."),
        "table": Param("document_summaries", type="string", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
        "partition": Param(
            None, type=["null", "string"], description="Partition to (re)write. Empty: the run's date."
        ),
        "chunk_rows": Param(1_000, type="integer", minimum=1, description="Documents per mapped task."),
        "max_tokens": Param(64, type="integer", minimum=1, description="Tokens to generate at most."),
        "max_in_flight": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            description="Requests in flight per task (default: 2 × the model's max_batch_size).",
        ),
    },
    doc_md=__doc__,
) as dag:

    @task
    def documents(params: dict[str, Any] | None = None) -> str:
        """The input path, or (when none is given) demo documents written from a fixed seed."""
        params = params or {}
        if params.get("input_path"):
            return str(params["input_path"])
        return str(write_documents(DOCUMENTS_PATH, int(params.get("documents") or 3_000)))

    stage = StageInputsOperator(
        task_id="stage",
        source=documents(),
        columns=["doc_id", "title", "body"],
        row_id_column="doc_id",
        chunk_rows="{{ params.chunk_rows }}",
        partition="{{ params.partition or '' }}",
    )
    start = None
    if SERVER_CONN_ID is None:
        start = StartTritonServerOperator(
            task_id="start_server", model_repository=str(REPOSITORY), models=["{{ params.model_name }}"]
        )
    generate = TritonGenerateOperator.partial(
        task_id="generate",
        server=start.output if start is not None else None,
        triton_conn_id=SERVER_CONN_ID or "triton_default",
        model_name="{{ params.model_name }}",
        prompt_template=PROMPT_TEMPLATE,
        generation={"max_tokens": "{{ params.max_tokens }}", "top_k": 1},  # greedy: reproducible text
        passthrough_columns=["title"],
        max_in_flight="{{ params.max_in_flight or '' }}",
        retries=2,
        map_index_template="chunk {{ task.chunk['index'] }}",
    ).expand(chunk=stage.output)
    persist = PersistOutputsOperator(
        task_id="persist",
        chunks=stage.output,
        results=generate.output,
        table="{{ params.table }}",
        partition="{{ params.partition or '' }}",
        sink_options={"database": str(batch_infer_home() / "warehouse.duckdb")},
    )
    if start is not None:
        stop = StopTritonServerOperator(task_id="stop_server", server=start.output)
        [stage, start] >> generate >> [persist, stop]
        stop.as_teardown(setups=start)
