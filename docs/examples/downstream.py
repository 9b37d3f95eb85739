"""A downstream DAG on the output table's Asset, which persist emits once a partition is committed."""

import pendulum
from airflow.sdk import DAG, task

from airflow_batch_infer.assets import output_asset

WAREHOUSE = "/data/warehouse.duckdb"

# --8<-- [start:asset]
scores = output_asset("duckdb", "transaction_scores", {"database": WAREHOUSE})

with DAG("report_on_scores", schedule=[scores], start_date=pendulum.datetime(2026, 11, 1)):

    @task
    def summarise(triggering_asset_events=None) -> None:
        for event in triggering_asset_events[scores]:
            print(event.extra["partition"], event.extra["rows"], event.extra["rows_per_second"])

    summarise()
# --8<-- [end:asset]
