"""The same pipeline with its Triton server on GPU nodes: docker, kubernetes and ecs, one DAG each."""

import pendulum
from airflow.sdk import DAG

from airflow_batch_infer.task_group import batch_inference

FEATURES = [f"f{i:02d}" for i in range(16)]
COMMON = {
    "source": "s3://aws_default@lake/transactions/{{ ds }}/",
    "staging_root": "s3://aws_default@ml-staging/batch-infer",
    "model_name": "risk_scorer",
    "model_repository": "/models",
    "inputs": {"features": FEATURES},
    "table": "transaction_scores",
    "sink": "postgres",
    "sink_options": {"postgres_conn_id": "warehouse"},
}
START = pendulum.datetime(2026, 11, 1)

with DAG("scoring_on_docker", schedule=None, start_date=START):
    # --8<-- [start:docker]
    batch_inference(
        **COMMON,
        runtime="docker",
        runtime_options={
            "docker_url": "tcp://gpu-host.internal:2376",  # default: the local socket
            "gpus": 1,
            "shm_size": "2g",
            "advertise_host": "gpu-host.internal",  # how workers reach the published ports
            "model_repository": "/srv/triton_models",  # on the Docker host
        },
    )
    # --8<-- [end:docker]

with DAG("scoring_on_kubernetes", schedule=None, start_date=START):
    # --8<-- [start:kubernetes]
    batch_inference(
        **COMMON,
        runtime="kubernetes",
        runtime_options={
            "namespace": "ml",
            "gpus": 1,
            "cpu": "8",
            "memory": "32Gi",
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "model_repository": "s3://my-models/triton",
            "service_account_name": "triton-s3-reader",  # IAM role for S3; or aws_secret_name
            # or a volume: "model_repository": "/models", "model_repository_pvc": "triton-models",
        },
    )
    # --8<-- [end:kubernetes]

with DAG("scoring_on_ecs", schedule=None, start_date=START):
    # --8<-- [start:ecs]
    batch_inference(
        **COMMON,
        runtime="ecs",
        runtime_options={
            "cluster": "gpu",
            "capacity_provider": "gpu-asg",  # or launch_type="EC2"
            "subnets": ["subnet-0abc"],
            "security_groups": ["sg-0def"],
            "memory": "61440",
            "shm_size_mib": 4096,
            "log_group": "/airflow/triton",
            "execution_role_arn": "arn:aws:iam::123456789012:role/ecsTaskExecutionRole",
            "task_role_arn": "arn:aws:iam::123456789012:role/triton-models-reader",
            "model_repository": "s3://my-models/triton",
        },
    )
    # --8<-- [end:ecs]

with DAG("scoring_on_kubernetes_fleet", schedule=None, start_date=START):
    # --8<-- [start:fleet]
    batch_inference(
        source="s3://aws_default@lake/transactions/{{ ds }}/",
        staging_root="s3://aws_default@ml-staging/batch-infer",
        model_name="risk_scorer",
        model_repository="/models",  # as the server's image or volume sees it; or model_repository option
        inputs={"features": FEATURES},
        table="transaction_scores",
        sink="postgres",
        sink_options={"postgres_conn_id": "warehouse"},
        runtime="kubernetes",
        runtime_options={
            "kubernetes_conn_id": "kubernetes_default",
            "namespace": "ml",
            "model_repository": "s3://ml-models/triton",
            "aws_credentials_secret": "triton-s3-reader",
            "gpus": 1,
        },
        servers=4,
        min_ready=3,
        infer_options={"pool": "gpu_inference"},  # pool slots: about two per server
    )
    # --8<-- [end:fleet]
