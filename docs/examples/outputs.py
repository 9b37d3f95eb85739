"""Element columns, passthrough of every input column, and a post-processing function, on a classifier."""

import numpy as np
import pandas as pd
import pendulum
from airflow.sdk import DAG

from airflow_batch_infer.task_group import batch_inference


# --8<-- [start:outputs]
def refer_or_clear(frame: pd.DataFrame) -> pd.DataFrame:
    frame["decision"] = np.where(frame["p_malignant"] > 0.5, "refer", "clear")
    return frame


with DAG("case_scoring", schedule=None, start_date=pendulum.datetime(2026, 11, 1)):
    batch_inference(
        source="/data/etl/cases",
        model_name="tumor_classifier",  # triton_models/tumor_classifier: probabilities FP32 [2]
        model_repository="triton_models",
        inputs={"features": ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7"]},
        outputs={"probabilities": ["p_benign", "p_malignant"]},  # one column per value
        passthrough_columns="*",  # every input column no input tensor reads
        postprocess=refer_or_clear,  # pandas, in the infer tasks
        filter="amount > 20 AND customer_id < 150000",  # Parquet sources: only these rows
        table="case_scores",
    )
# --8<-- [end:outputs]
