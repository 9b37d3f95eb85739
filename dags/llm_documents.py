"""Demo data for LLM batch generation: documents (id, title, body) generated from a fixed seed.

About one document in fifty is longer than the stand-in model's ``max_input_len`` (400 words with the
prompt), so that a run shows rows set aside with the server's message next to the summaries.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_batch_infer.paths import batch_infer_home

if TYPE_CHECKING:  # imported where documents are made: every task process parses the DAG that imports this
    import numpy as np
    import pyarrow as pa

DOCUMENTS_PATH = batch_infer_home() / "etl" / "documents"
#: The prompt of ``dags/llm_batch_generation.py``: the document first, the instruction last.
PROMPT_TEMPLATE = "{title}\n\n{body}\n\nSummarise the document above in one short paragraph."
#: Every ``LONG_EVERY``-th document (from ``LONG_OFFSET``) is too long for the stand-in's prompt limit.
LONG_EVERY, LONG_OFFSET = 50, 17
FIRST_ID = 1_000_000

_SYLLABLES = ["ka", "lo", "mi", "ren", "sto", "va", "dul", "pe", "tri", "zon", "ar", "bel", "cé", "nä", "ü"]
_TOPICS = ["Quarterly", "Field", "Incident", "Market", "Research", "Customer", "Supply", "Safety"]
_KINDS = ["report", "notes", "review", "summary", "memo", "update"]


def _vocabulary(rng: np.random.Generator, size: int = 400) -> list[str]:
    words = set()
    while len(words) < size:
        parts = rng.choice(_SYLLABLES, size=int(rng.integers(1, 4)))
        words.add("".join(parts))
    return sorted(words)


def documents(count: int, seed: int = 11) -> pa.Table:
    """``count`` documents as a table: ``doc_id`` (int64), ``title`` and ``body`` (strings).

    :param count: number of documents.
    :param seed: random seed; the same seed gives the same documents.
    """
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    vocabulary = np.array(_vocabulary(rng), dtype=object)
    titles, bodies = [], []
    for i in range(count):
        long = i % LONG_EVERY == LONG_OFFSET
        words = int(rng.integers(420, 600) if long else rng.integers(20, 240))
        sentence_ends = set(np.cumsum(rng.integers(6, 16, size=words)).tolist())
        body = [
            f"{w}." if (j + 1) in sentence_ends else str(w)
            for j, w in enumerate(rng.choice(vocabulary, size=words))
        ]
        titles.append(f"{_TOPICS[i % len(_TOPICS)]} {_KINDS[i % len(_KINDS)]} {i}")
        bodies.append(" ".join(body).capitalize())
    return pa.table(
        {
            "doc_id": pa.array(np.arange(FIRST_ID, FIRST_ID + count, dtype=np.int64)),
            "title": pa.array(titles, type=pa.string()),
            "body": pa.array(bodies, type=pa.string()),
        }
    )


def write_documents(target: str | Path, count: int, files: int = 2, seed: int = 11) -> Path:
    """Write ``count`` documents as ``files`` Parquet files in ``target`` (replacing earlier ones).

    :param target: output folder.
    :param count: number of documents.
    :param files: number of files.
    :param seed: random seed; the same seed gives the same documents.
    """
    import numpy as np
    import pyarrow.parquet as pq

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.parquet"):
        old.unlink()
    table = documents(count, seed)
    bounds = np.linspace(0, count, files + 1, dtype=np.int64)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        # Row groups of 500 documents: a chunk (read by reference) ends at a row group.
        pq.write_table(
            table.slice(int(lo), int(hi - lo)), target / f"part-{i:03d}.parquet", row_group_size=500
        )
    return target
