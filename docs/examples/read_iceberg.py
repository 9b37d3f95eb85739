"""Read one partition of the iceberg sink's embedded catalog back, as pyarrow."""

import pyarrow as pa


# --8<-- [start:read]
def read_day(lake: str, day: str) -> pa.Table:
    """The rows of partition ``day`` of ``transaction_scores``, under the sink's ``warehouse`` ``lake``."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.expressions import EqualTo

    catalog = load_catalog(
        "default", type="sql", uri=f"sqlite:///{lake}/catalog.db", warehouse=f"file://{lake}"
    )
    table = catalog.load_table("default.transaction_scores")
    return table.scan(row_filter=EqualTo("batch_partition", day)).to_arrow()


# --8<-- [end:read]
