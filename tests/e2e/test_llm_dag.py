"""``llm_batch_generation`` run by Airflow itself (``dag.test()``) on the stand-in model: every document ends
in the summaries table or its rejects table exactly once, with the stand-in's text, and a rerun of the
partition leaves the same rows."""

from __future__ import annotations

import duckdb
import pendulum
import pytest
from llm_documents import LONG_EVERY, LONG_OFFSET, PROMPT_TEMPLATE, documents

from tests.conftest import load_dag, processes_mentioning, task_states

pytestmark = pytest.mark.e2e

LOGICAL_DATE = pendulum.datetime(2026, 11, 21, tz="UTC")
DOCS, CHUNK, MAX_TOKENS = 1_200, 500, 16
TABLE = "document_summaries_e2e"


@pytest.fixture(scope="module")
def llm_dag(airflow_db):
    return load_dag("llm_batch_generation")


def read(sql: str) -> list[tuple]:
    from airflow_batch_infer.paths import batch_infer_home

    with duckdb.connect(str(batch_infer_home() / "warehouse.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_every_document_is_summarised_or_set_aside_once(llm_dag) -> None:
    from airflow_batch_infer.paths import batch_infer_home

    conf = {"documents": DOCS, "chunk_rows": CHUNK, "max_tokens": MAX_TOKENS, "table": TABLE}
    first = llm_dag.test(logical_date=LOGICAL_DATE, run_conf=conf)
    assert first.state == "success", task_states(first)
    assert task_states(first)["generate"] == ["success"] * 3

    docs = documents(DOCS).to_pylist()
    long_ids = {d["doc_id"] for i, d in enumerate(docs) if i % LONG_EVERY == LONG_OFFSET}
    summaries = read(
        f"SELECT doc_id, title, generated_text, input_tokens, output_tokens, batch_partition FROM {TABLE}"
    )
    rejects = read(f"SELECT doc_id, reject_reason FROM {TABLE}_rejects")
    summarised = [row[0] for row in summaries]
    set_aside = [row[0] for row in rejects]
    assert len(summarised) == len(set(summarised)) == DOCS - len(long_ids)
    assert set(set_aside) == long_ids
    assert len(set_aside) == len(long_ids)
    assert sorted(summarised + set_aside) == [d["doc_id"] for d in docs]
    assert all("more than max_input_len 400" in reason for _, reason in rejects)

    by_id = {d["doc_id"]: d for d in docs}
    for doc_id, title, text, tokens_in, tokens_out, partition in summaries:
        words = PROMPT_TEMPLATE.format(**by_id[doc_id]).split()
        assert (title, partition) == (by_id[doc_id]["title"], "2026-11-21")
        assert text == "summary: " + " ".join(words[:MAX_TOKENS])
        assert (tokens_in, tokens_out) == (len(words), MAX_TOKENS)

    again = llm_dag.test(logical_date=LOGICAL_DATE, run_conf=conf)
    assert again.state == "success", task_states(again)
    assert read(f"SELECT count(*), count(DISTINCT doc_id) FROM {TABLE}") == [(len(summarised),) * 2]
    assert read(f"SELECT count(*) FROM {TABLE}_rejects") == [(len(long_ids),)]
    assert processes_mentioning(batch_infer_home() / "servers") == []
