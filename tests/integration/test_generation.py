"""LLM generation against the real local tritonserver serving ``llm_stand_in`` (the TensorRT-LLM ensemble's
tensors, deterministic text): prompts from a template, per-job and per-row parameters, stop words, token
counts, too-long prompts set aside with the server's message, tokens/s in the log, both transports."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llm_documents import LONG_EVERY, LONG_OFFSET, PROMPT_TEMPLATE, documents

from airflow_batch_infer.client.streaming import REASON_COLUMN
from airflow_batch_infer.client.tensors import ContractError
from airflow_batch_infer.operators.generate import TritonGenerateOperator
from airflow_batch_infer.runtimes import get_runtime
from airflow_batch_infer.staging import stage_parquet
from tests.conftest import MODEL_REPOSITORY

pytestmark = pytest.mark.integration

MODEL = "llm_stand_in"
DOCS = 300
STOP = "STOP"
MAX_INPUT_LEN = 400


def stand_in(prompt: str, max_tokens: int, min_tokens: int = 0, stop=(), bad=()) -> tuple[str, int]:
    """The stand-in's rule, written again: the text it must return and the tokens it generated."""
    kept: list[str] = []
    for word in prompt.split():
        if len(kept) >= max_tokens:
            break
        if word in stop and len(kept) >= min_tokens:
            break
        if word in bad:
            continue
        kept.append(word)
    return "summary: " + " ".join(kept), len(kept)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runtime = get_runtime("local", work_root=str(tmp_path_factory.mktemp("servers")))
    info = runtime.start(str(MODEL_REPOSITORY), [MODEL])
    yield info
    runtime.stop(info)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    """Documents with per-row parameter columns; every seventh body has the stop word at its 4th word."""
    docs = documents(DOCS)
    bodies = docs.column("body").to_pylist()
    for i in range(0, DOCS, 7):
        words = bodies[i].split()
        bodies[i] = " ".join([*words[:3], STOP, *words[3:]])
    n = np.arange(DOCS)
    return (
        docs.set_column(2, "body", pa.array(bodies))
        .append_column("summary_len", pa.array((n % 20 + 1).astype(np.int32)))
        .append_column("min_len", pa.array((n % 3 * 4).astype(np.int64)))
        .append_column("temperature", pa.array(n % 5 / 10.0))
        .append_column("seed", pa.array(n.astype(np.int64) * 1_000_003))
    )


@pytest.fixture(scope="module")
def chunk(table, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("llm")
    (root / "in").mkdir()
    pq.write_table(table, root / "in" / "docs.parquet")
    return stage_parquet(root / "in", root / "run", row_id_column="doc_id").chunks[0].to_dict()


def generate(server, chunk, **kwargs) -> TritonGenerateOperator:
    return TritonGenerateOperator(
        task_id="generate",
        chunk=chunk,
        server=server.to_dict(),
        model_name=MODEL,
        **{"prompt_template": PROMPT_TEMPLATE, **kwargs},
    )


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_every_row_gets_its_text_and_counts_or_the_servers_reason(
    server, chunk, table, transport, capfd
) -> None:
    operator = generate(
        server,
        chunk,
        generation={"stop_words": [STOP, "never-seen"], "top_p": 0.9, "top_k": 40},
        parameter_columns={
            "max_tokens": "summary_len",
            "min_tokens": "min_len",
            "temperature": "temperature",
            "seed": "seed",
        },
        passthrough_columns=["title"],
        transport=transport,
    )
    result = operator.execute({})
    log = capfd.readouterr().out  # the task logger (structlog) writes to stdout

    rows = table.to_pylist()
    long_ids = {r["doc_id"] for i, r in enumerate(rows) if i % LONG_EVERY == LONG_OFFSET}
    assert (result["rows_out"], result["rows_rejected"]) == (DOCS - len(long_ids), len(long_ids))
    assert result["shared_memory"] is False

    rejects = pq.read_table(result["rejects_path"])
    assert set(rejects.column("doc_id").to_pylist()) == long_ids
    by_id = {r["doc_id"]: r for r in rows}
    for doc_id, reason in zip(
        rejects.column("doc_id").to_pylist(), rejects.column(REASON_COLUMN).to_pylist(), strict=True
    ):
        words = len(PROMPT_TEMPLATE.format(**by_id[doc_id]).split())
        assert reason.startswith("refused by the server:"), reason
        assert f"prompt has {words} tokens, more than max_input_len {MAX_INPUT_LEN}" in reason

    out = pq.read_table(result["output_path"])
    assert out.column_names == ["doc_id", "title", "generated_text", "input_tokens", "output_tokens"]
    stopped = 0
    for got in out.to_pylist():
        row = by_id[got["doc_id"]]
        prompt = PROMPT_TEMPLATE.format(**row)
        text, tokens = stand_in(prompt, row["summary_len"], row["min_len"], stop=(STOP, "never-seen"))
        assert got["title"] == row["title"]
        assert got["generated_text"] == text
        assert (got["input_tokens"], got["output_tokens"]) == (len(prompt.split()), tokens)
        stopped += tokens < min(row["summary_len"], len(prompt.split()))
    assert stopped > 5, "the stop word should have cut some texts short"
    assert result["tokens_out"] == sum(out.column("output_tokens").to_pylist())
    assert re.search(r"chunk 0: 300/300 rows \(100%\), [\d,]+ rows/s, [\d,]+ tokens/s, 6 set aside", log), log


def test_job_level_parameters_and_sizes_follow_the_model(server, chunk, table) -> None:
    operator = generate(server, chunk, generation={"max_tokens": "5", "bad_words": "['Quarterly', 'Field']"})
    result = operator.execute({})

    # max_tokens and bad_words arrived as text (as Jinja renders them) and were read back.
    assert operator.input_constants["max_tokens"] == 5
    assert operator.input_constants["return_num_output_tokens"] is True
    assert (operator.request_rows, operator.max_in_flight) == (1, 128)  # 2 × max_batch_size 64
    assert operator.token_count_output == "num_output_tokens"
    out = {r["doc_id"]: r for r in pq.read_table(result["output_path"]).to_pylist()}
    for row in table.to_pylist():
        if row["doc_id"] in out:
            expected, _ = stand_in(PROMPT_TEMPLATE.format(**row), 5, bad=("Quarterly", "Field"))
            assert out[row["doc_id"]]["generated_text"] == expected


def test_a_stop_word_per_row_from_a_string_column(server, tmp_path) -> None:
    prompts = [f"w{i} alpha beta gamma delta epsilon" for i in range(40)]
    stops = ["gamma" if i % 2 else "never" for i in range(40)]
    data = pa.table({"doc_id": pa.array(range(40), pa.int64()), "q": prompts, "stop": stops})
    (tmp_path / "in").mkdir()
    pq.write_table(data, tmp_path / "in" / "q.parquet")
    chunk = stage_parquet(tmp_path / "in", tmp_path / "run", row_id_column="doc_id").chunks[0].to_dict()
    operator = generate(
        server,
        chunk,
        prompt_template="{q}",
        generation={"max_tokens": 5},
        parameter_columns={"stop_words": "stop"},
    )
    out = pq.read_table(operator.execute({})["output_path"]).to_pylist()
    assert [r["generated_text"] for r in out] == [
        f"summary: w{i} alpha beta" if i % 2 else f"summary: w{i} alpha beta gamma delta" for i in range(40)
    ]


def test_the_prompt_comes_back_only_when_asked(server, chunk, table) -> None:
    operator = generate(server, chunk, generation={"max_tokens": 3, "exclude_input_in_output": False})
    result = operator.execute({})
    first = pq.read_table(result["output_path"]).slice(0, 1).to_pylist()[0]
    row = next(r for r in table.to_pylist() if r["doc_id"] == first["doc_id"])
    prompt = PROMPT_TEMPLATE.format(**row)
    assert first["generated_text"] == f"{prompt} {stand_in(prompt, 3)[0]}"


def test_parameters_are_checked_against_the_model(server, chunk) -> None:
    with pytest.raises(ContractError, match=r"\['temprature'\] in generation are not inputs of model"):
        generate(server, chunk, generation={"temprature": 0.5}).execute({})
    with pytest.raises(ContractError, match=r"\['top_n'\] in parameter_columns are not inputs"):
        generate(server, chunk, parameter_columns={"top_n": "seed"}).execute({})
    with pytest.raises(ContractError, match=r"Column 'nope' \(for input tensor 'max_tokens'\)"):
        generate(server, chunk, parameter_columns={"max_tokens": "nope"}).execute({})
    with pytest.raises(ContractError, match=r"uses column\(s\) \['summary'\] that are not in the data"):
        generate(server, chunk, prompt_template="{summary}").execute({})
    with pytest.raises(ValueError, match=r"\['max_tokens'\] are given both per row"):
        generate(server, chunk, generation={"max_tokens": 4}, parameter_columns={"max_tokens": "summary_len"})
