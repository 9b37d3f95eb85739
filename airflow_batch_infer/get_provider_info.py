"""Provider registration, read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

import importlib.util
from typing import Any

from airflow_batch_infer import __version__
from airflow_batch_infer.config import provider_config


def aws_links() -> list[str]:
    """The ECS server's links, listed where the amazon provider (the ``amazon`` extra) is installed.

    Looked up when Airflow asks, not when this module is imported: ``find_spec`` of a submodule of
    ``airflow`` imports Airflow, whose provider discovery would import this module while it is half made.
    """
    if importlib.util.find_spec("airflow.providers.amazon") is None:
        return []
    return [f"airflow_batch_infer.links_aws.{name}" for name in ("EcsTaskLink", "TritonCloudWatchLogLink")]


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-batch-infer",
        "name": "Batch inference on Triton",
        "description": "Offline batch inference on NVIDIA Triton Inference Server.",
        "versions": [__version__],
        "config": provider_config(),
        "integrations": [
            {
                "integration-name": "NVIDIA Triton Inference Server",
                "external-doc-url": "https://docs.nvidia.com/deeplearning/triton-inference-server/",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": "NVIDIA Triton Inference Server",
                "python-modules": [
                    "airflow_batch_infer.operators.stage",
                    "airflow_batch_infer.operators.server",
                    "airflow_batch_infer.operators.infer",
                    "airflow_batch_infer.operators.generate",
                    "airflow_batch_infer.operators.persist",
                    "airflow_batch_infer.operators.report",
                    "airflow_batch_infer.operators.reaper",
                ],
            }
        ],
        "triggers": [
            {
                "integration-name": "NVIDIA Triton Inference Server",
                "python-modules": ["airflow_batch_infer.triggers.server"],
            }
        ],
        "extra-links": [
            "airflow_batch_infer.links.TritonMetricsLink",
            "airflow_batch_infer.links.TritonServerLogLink",
            "airflow_batch_infer.links.KubernetesPodLink",
            *aws_links(),
            "airflow_batch_infer.links.OutputTableLink",
            "airflow_batch_infer.links.RunReportLink",
        ],
        "hooks": [
            {
                "integration-name": "NVIDIA Triton Inference Server",
                "python-modules": ["airflow_batch_infer.hooks.triton"],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_batch_infer.hooks.triton.TritonHook",
                "hook-name": "Triton Inference Server",
                "connection-type": "triton",
                "conn-fields": {
                    "ssl": {"label": "Use TLS", "schema": {"type": ["boolean", "null"], "default": False}},
                    "root_certificates": {
                        "label": "CA certificate file",
                        "schema": {"type": ["string", "null"]},
                    },
                    "private_key": {"label": "Client key file", "schema": {"type": ["string", "null"]}},
                    "certificate_chain": {
                        "label": "Client certificate file",
                        "schema": {"type": ["string", "null"]},
                    },
                    "headers": {
                        "label": "Request headers (JSON object)",
                        "schema": {"type": ["object", "null"]},
                    },
                    "max_message_mb": {
                        "label": "Max gRPC message size (MiB)",
                        "schema": {"type": ["integer", "null"], "default": 1024},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "password"],
                    "relabeling": {"port": "gRPC port"},
                    "placeholders": {"host": "triton.example.internal", "port": "8001"},
                },
            }
        ],
    }
