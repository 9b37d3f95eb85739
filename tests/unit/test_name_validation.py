"""Names checked with a full match: a trailing newline is not a valid name (``$`` matches before one)."""

from __future__ import annotations

import pytest

from airflow_batch_infer.runtimes.labels import k8s_label_value
from airflow_batch_infer.sinks import get_sink

ROLE = "arn:aws:iam::123456789012:role/redshift-loader"


def test_an_iam_role_with_a_trailing_newline_is_refused() -> None:
    options = {"table": "analytics.scores", "database": "dev", "cluster_identifier": "c", "db_user": "u"}
    assert get_sink("redshift", iam_role=ROLE, **options).iam_role == ROLE
    with pytest.raises(ValueError, match="not an IAM role ARN"):
        get_sink("redshift", iam_role=ROLE + "\n", **options)


def test_a_label_value_with_a_trailing_newline_is_cleaned_and_hashed() -> None:
    assert k8s_label_value("manual__2026") == "manual__2026"
    cleaned = k8s_label_value("manual__2026\n")
    assert cleaned != "manual__2026"
    assert "\n" not in cleaned
    assert cleaned.startswith("manual__2026")


def test_athena_refuses_a_quote_that_hive_ddl_would_swallow() -> None:
    from airflow_batch_infer.sinks.athena import ddl_literal

    assert ddl_literal("s3://bucket/warehouse/scores/") == "'s3://bucket/warehouse/scores/'"
    with pytest.raises(ValueError, match="cannot hold a single quote"):
        ddl_literal("s3://bucket/o'neil/")
    with pytest.raises(ValueError, match="cannot hold a single quote"):
        get_sink(
            "athena", table="analytics.scores", location="s3://bucket/o'neil", output_location="s3://b/r/"
        )
