"""The pipeline composed from the operators themselves, as ``batch_inference(...)`` wires them."""

import pendulum
from airflow.sdk import DAG

from airflow_batch_infer.operators.infer import TritonInferenceOperator
from airflow_batch_infer.operators.persist import PersistOutputsOperator
from airflow_batch_infer.operators.report import RunReportOperator
from airflow_batch_infer.operators.server import StartTritonServerOperator, StopTritonServerOperator
from airflow_batch_infer.operators.stage import StageInputsOperator

with DAG("scoring_operators", schedule=None, start_date=pendulum.datetime(2026, 11, 1)):
    # --8<-- [start:wiring]
    stage = StageInputsOperator(task_id="stage", source="/data/etl/transactions")
    start = StartTritonServerOperator(
        task_id="start_server", model_repository="/opt/triton_models", models=["risk_scorer"]
    )
    infer = TritonInferenceOperator.partial(
        task_id="infer",
        server=start.output,
        model_name="risk_scorer",
        inputs={"features": [f"f{i:02d}" for i in range(16)]},
        outputs={"probability": "risk_score"},
        passthrough_columns=["transaction_id"],
        retries=2,
    ).expand(chunk=stage.output)  # one mapped task per chunk
    persist = PersistOutputsOperator(
        task_id="persist",
        chunks=stage.output,
        results=infer.output,
        table="transaction_scores",
        sink_options={"database": "/data/warehouse.duckdb"},
        write_report=False,  # the report task writes it, once the table is committed
    )
    report = RunReportOperator(
        task_id="report", chunks=stage.output, results=infer.output, persisted=persist.output
    )
    stop = StopTritonServerOperator(task_id="stop_server", server=start.output)
    [stage, start] >> infer >> [persist, stop]
    persist >> report
    stop.as_teardown(setups=start)  # runs whatever happened, once the server started
    # --8<-- [end:wiring]
