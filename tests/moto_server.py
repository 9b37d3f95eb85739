"""``moto_server`` with the two Redshift Data API calls that moto 5.2 lacks, for the data-path tests.

Run as ``python tests/moto_server.py -H 127.0.0.1 -p PORT`` (the arguments of ``moto_server``). Moto
implements ExecuteStatement and DescribeStatement but not BatchExecuteStatement (one transaction of
several statements, which the redshift sink uses) nor DescribeTable. This adds them on moto's own model:
a batch is stored like moto stores a statement (its SQL texts joined, each also as a sub-statement), and
stays ``STARTED`` forever, as moto's statements do; DescribeTable reports no columns (no such table),
since moto keeps no tables. Nothing else of moto is changed.
"""

from __future__ import annotations

import json
import sys

from moto.redshiftdata.responses import RedshiftDataAPIServiceResponse
from moto.server import main


def batch_execute_statement(self: RedshiftDataAPIServiceResponse) -> tuple[int, dict, str]:
    sqls = self._get_param("Sqls")
    statement = self.redshiftdata_backend.execute_statement(
        cluster_identifier=self._get_param("ClusterIdentifier"),
        database=self._get_param("Database"),
        db_user=self._get_param("DbUser"),
        parameters=None,
        secret_arn=self._get_param("SecretArn"),
        sql=";\n".join(sqls),
    )
    statement.sub_statements = [
        {"Id": f"{statement.id}:{i}", "QueryString": sql, "Status": "SUBMITTED"}
        for i, sql in enumerate(sqls, start=1)
    ]
    body = {
        "ClusterIdentifier": statement.cluster_identifier,
        "CreatedAt": statement.created_at,
        "Database": statement.database,
        "DbUser": statement.db_user,
        "Id": statement.id,
        "SecretArn": statement.secret_arn,
        "WorkgroupName": self._get_param("WorkgroupName"),
    }
    return 200, {}, json.dumps({k: v for k, v in body.items() if v is not None})


def describe_table(self: RedshiftDataAPIServiceResponse) -> tuple[int, dict, str]:
    return 200, {}, json.dumps({"ColumnList": [], "TableName": self._get_param("Table")})


RedshiftDataAPIServiceResponse.batch_execute_statement = batch_execute_statement
RedshiftDataAPIServiceResponse.describe_table = describe_table

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
