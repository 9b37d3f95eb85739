"""Summarise documents with an LLM served by Triton's TensorRT-LLM backend, on a GPU host's Docker."""

import pendulum
from airflow.sdk import DAG

from airflow_batch_infer.operators.generate import TritonGenerateOperator
from airflow_batch_infer.task_group import batch_inference

with DAG("document_summaries", schedule=None, start_date=pendulum.datetime(2026, 11, 1)):
    # --8<-- [start:generate]
    batch_inference(
        source="/data/documents",  # doc_id, title, body, summary_len
        model_name="ensemble",
        model_repository="triton_models/llm/repository",
        inputs={},  # the prompt comes from the template
        row_id_column="doc_id",
        passthrough_columns=["title"],
        table="document_summaries",
        runtime="docker",
        runtime_options={
            "image": "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3",
            "shm_size": "2g",
            "volumes": ["/data/engines/llm:/engines/llm:ro", "/data/hf/llama:/tokenizer:ro"],
        },
        infer_operator=TritonGenerateOperator,
        infer_options={
            "prompt_template": "{title}\n\n{body}\n\nSummarise the document above in one short paragraph.",
            "generation": {
                "max_tokens": 256,
                "temperature": 0.2,
                "top_p": 0.9,
                "seed": 7,
                "stop_words": ["\n\n"],
            },
            "parameter_columns": {"max_tokens": "summary_len"},  # per row, from a column
        },
    )
    # --8<-- [end:generate]
