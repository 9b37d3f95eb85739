"""A site's own sink, as a user writes one outside the package: used by class path in the tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.sinks import PersistResult, WarehouseSink


class ParquetFolderSink(WarehouseSink):
    """One Parquet file per table and partition under ``folder``, replaced whole (write, then rename).

    :param folder: where the tables' folders go.
    """

    name = "tests.plugin_sink:ParquetFolderSink"

    def __init__(self, table: str, folder: str, **kwargs) -> None:
        super().__init__(table, **kwargs)
        self.folder = Path(folder)

    def _write(self, table: str, partition: str, parts: Sequence) -> int:
        rows = pa.concat_tables([open_parquet(p).read() for p in parts]) if parts else pa.table({})
        target = self.folder / table / f"{self.partition_column}={partition}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
        return rows.num_rows

    def replace_partition(
        self, partition: str, output_parts: Sequence, reject_parts: Sequence
    ) -> PersistResult:
        rows = self._write(self.table, partition, output_parts)
        rejected = self._write(self.rejects_table, partition, reject_parts)
        return self._result(partition, rows, rejected, 0, str(self.folder))
