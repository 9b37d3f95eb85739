"""StartTritonServerOperator (a setup task) and StopTritonServerOperator (its teardown)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, conf
from airflow.sdk.exceptions import AirflowSkipException

from airflow_batch_infer.config import get_float, get_setting
from airflow_batch_infer.errors import model_load_failure
from airflow_batch_infer.links import KubernetesPodLink, TritonMetricsLink, TritonServerLogLink, aws_links
from airflow_batch_infer.runtimes import RUNTIMES, ServerInfo, ServerOwner, ServerStartError, get_runtime
from airflow_batch_infer.runtimes.base import TritonRuntime
from airflow_batch_infer.runtimes.fleet import (
    SHARED_HOST_RUNTIMES,
    fleet_output,
    fleet_servers,
    replica_options,
    replica_owner,
    resolve_servers,
    visible_gpus,
)
from airflow_batch_infer.runtimes.statistics import server_work
from airflow_batch_infer.slot_release import release_slot_at_exit
from airflow_batch_infer.triggers.server import TritonServerReadyTrigger

#: Extra time Airflow gives a deferred start beyond the trigger's own deadline, so that the trigger (which
#: reports the server's log lines) fails first.
_DEFER_MARGIN = timedelta(minutes=5)


class StartTritonServerOperator(BaseOperator):
    """Start the job's Triton Inference Server(s), wait until their models are ready, return their endpoints.

    Use it as a setup task; the returned fleet (:mod:`~airflow_batch_infer.runtimes.fleet`: the first
    server's endpoint and handle, and ``servers`` with every one's) is what :class:`StopTritonServerOperator`
    and the infer tasks take. Each server is labelled with this task's DAG run and its replica index, so that
    ``TritonServerReaperOperator`` can stop it if the run ends without its teardown.

    :param model_repository: the model repository (``<model>/config.pbtxt``); the runtimes' own
        ``model_repository`` option overrides where a remote server reads it (``s3://...``).
    :param models: models to load (all in the repository when ``None``).
    :param runtime: where the server runs: ``local`` (a process on this machine), ``docker``,
        ``kubernetes``, ``ecs``, or a site's own (an entry point name or ``"module:Class"``, see
        :func:`~airflow_batch_infer.runtimes.get_runtime`); default ``[batch_infer] default_runtime``.
    :param runtime_options: keyword options of the runtime (see ``airflow_batch_infer.runtimes``).
    :param servers: how many servers, each with its own endpoint, or ``"auto"``: one per visible GPU for
        the local and docker runtimes (1 on a host without GPUs), each given its share of the GPUs; 1 for
        kubernetes and ecs, whose Pods and tasks each ask for GPUs of their own. They start at once.
    :param min_ready: how many must be ready for the run to go on (default: all). Deferred, the task
        resumes once that many are ready and the others join when ready; not deferred, it waits until
        every server is ready or failed. Servers that failed are stopped and left out.
    :param deferrable: launch, then wait in the triggerer (``TritonServerReadyTrigger``) while the models
        load, holding no worker slot.
    :param poll_interval: seconds between readiness polls when deferred.
    :param lease_timeout: seconds a server may go without a lease renewal before its keeper (or the
        reaper) stops it; the start task renews it while it waits, the infer and persist tasks while they
        work (``airflow_batch_infer.runtimes.lease.renew``). Default: ``[batch_infer] lease_timeout``
        (30 minutes) for the built-in runtimes, the runtime's own for a site's.
    :param reattach: a retry of this task first looks for running servers that an earlier try started
        (same DAG run, task, map index and replica, same models) and returns them, waiting for those still
        loading, instead of starting more.
    :param validate_only: start nothing and skip (templated): a run that only makes its checks (see
        ``StageInputsOperator``); its teardown is skipped with it.
    """

    template_fields: Sequence[str] = (
        "model_repository",
        "models",
        "runtime",
        "runtime_options",
        "servers",
        "validate_only",
    )
    ui_color = "#76b900"
    operator_extra_links = (TritonMetricsLink(), TritonServerLogLink(), KubernetesPodLink(), *aws_links())

    def __init__(
        self,
        *,
        model_repository: str,
        models: list[str] | None = None,
        runtime: str | None = None,
        runtime_options: dict[str, Any] | None = None,
        servers: int | str = 1,
        min_ready: int | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 5.0,
        lease_timeout: float | None = None,
        reattach: bool = True,
        validate_only: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.validate_only = validate_only
        runtime = runtime or get_setting("default_runtime") or "local"
        if not (isinstance(servers, str) and "{{" in servers):
            resolve_servers(servers, runtime if "{{" not in str(runtime) else "local", gpus=[])  # checks it
        if min_ready is not None and int(min_ready) < 1:
            raise ValueError(f"min_ready must be at least 1, not {min_ready}.")
        self.model_repository = model_repository
        self.models = models
        self.runtime = runtime
        self.runtime_options = runtime_options or {}
        self.servers = servers
        self.min_ready = min_ready
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.lease_timeout = lease_timeout
        self.reattach = reattach

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the models the servers load, in their repository, with their newest version.

        :param task_instance: the finished task instance (unused).
        """
        from airflow_batch_infer.lineage import start_lineage

        return start_lineage(str(self.model_repository), list(self.models) if self.models else None)

    def _runtime_options(self) -> dict[str, Any]:
        options = dict(self.runtime_options)
        if self.lease_timeout is not None:
            options["lease_timeout"] = float(self.lease_timeout)
        elif "lease_timeout" not in options and self.runtime in RUNTIMES:
            options["lease_timeout"] = get_float("lease_timeout")
        return options

    def execute(self, context: Any) -> dict[str, Any]:
        release_slot_at_exit()
        if str(self.validate_only).strip().lower() in ("true", "1", "yes", "on"):
            raise AirflowSkipException("validate_only: the run only makes its checks; no server is started.")
        gpus = visible_gpus() if self.runtime in SHARED_HOST_RUNTIMES else []
        count = resolve_servers(self.servers, self.runtime, gpus)
        min_ready = count if self.min_ready is None else min(int(self.min_ready), count)
        runtimes = [
            get_runtime(
                self.runtime, **replica_options(self.runtime, self._runtime_options(), i, count, gpus)
            )
            for i in range(count)
        ]
        models = list(self.models) if self.models else None
        owner = ServerOwner.from_context(context)
        if count > 1:
            self.log.info(
                "Starting %d Triton servers (%s runtime%s); the run goes on when %d are ready.",
                count,
                self.runtime,
                f", GPUs {gpus} shared among them" if gpus else "",
                min_ready,
            )
        if not self.deferrable:
            return self._start_and_wait(runtimes, models, owner, min_ready)
        launched = []
        try:
            for i, runtime in enumerate(runtimes):
                earlier = self._earlier(runtime, replica_owner(owner, i), models)
                launched.append(
                    earlier or runtime.launch(str(self.model_repository), models, replica_owner(owner, i))
                )
        except BaseException as error:
            self._stop_all(runtimes[0], launched)
            failure = model_load_failure(str(error)) if isinstance(error, ServerStartError) else None
            if failure is not None:
                raise failure from error
            raise
        timeout = runtimes[0].startup_timeout
        self.log.info(
            "Triton server(s) %s launched (%s runtime); deferring until %d are ready (at most %.0f s).",
            ", ".join(str(info.handle.get("server_id")) for info in launched),
            self.runtime,
            min_ready,
            timeout,
        )
        self.defer(
            trigger=TritonServerReadyTrigger(
                servers=[info.to_dict() for info in launched],
                runtime=self.runtime,
                runtime_options=self._runtime_options(),
                models=models,
                deadline=time.time() + timeout,
                poll_interval=self.poll_interval,
                min_ready=min_ready,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=timeout) + _DEFER_MARGIN,
        )

    def _earlier(
        self, runtime: TritonRuntime, owner: ServerOwner | None, models: list[str] | None
    ) -> ServerInfo | None:
        """A server that an earlier try of this task started for this replica, its lease renewed."""
        earlier = runtime.find_server(owner, models) if (self.reattach and owner) else None
        if earlier is not None:
            self.log.info(
                "Reattaching to Triton server %s, started by an earlier try of this task (%s runtime).",
                earlier.handle.get("server_id"),
                earlier.runtime,
            )
            runtime.renew_lease(earlier)
        return earlier

    def _start_and_wait(
        self,
        runtimes: list[TritonRuntime],
        models: list[str] | None,
        owner: ServerOwner | None,
        min_ready: int,
    ) -> dict[str, Any]:
        """Start (or reattach to) every replica at once, in threads; keep the ready, leave out the rest."""

        def start(replica: int) -> ServerInfo:
            runtime, replica_of = runtimes[replica], replica_owner(owner, replica)
            earlier = self._earlier(runtime, replica_of, models)
            if earlier is not None:
                return runtime.wait_ready(earlier, models)
            return runtime.start(str(self.model_repository), models, owner=replica_of)

        if len(runtimes) == 1:
            try:
                info = start(0)
            except ServerStartError as error:
                failure = model_load_failure(str(error))
                if failure is not None:
                    raise failure from error
                raise
            self._log_ready([info])
            return fleet_output([info])
        with ThreadPoolExecutor(max_workers=len(runtimes), thread_name_prefix="start-server") as pool:
            futures = [pool.submit(start, i) for i in range(len(runtimes))]
        ready, errors = [], []
        for future in futures:
            try:
                ready.append(future.result())
            except Exception as error:
                errors.append(str(error))
        for message in errors:
            self.log.error("A Triton server of this run did not become ready (left out): %s", message)
        if len(ready) < min_ready:
            self._stop_all(runtimes[0], ready)
            message = (
                f"Only {len(ready)} of {len(runtimes)} Triton servers became ready, fewer than "
                f"min_ready={min_ready}.\n" + "\n\n".join(errors)
            )
            raise model_load_failure(message) or ServerStartError(message)
        self._log_ready(ready)
        return fleet_output(ready)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Resume after the trigger: return the ready servers (and those still loading), or stop what was
        launched and fail."""
        release_slot_at_exit()
        runtime = get_runtime(self.runtime, **self._runtime_options())
        for failure in event.get("failed") or []:
            self.log.error(
                "A Triton server of this run did not become ready (left out): %s", failure["message"]
            )
            with contextlib.suppress(Exception):
                runtime.stop(ServerInfo.from_dict(failure["server"]))
        if "ready" not in event and event.get("server"):  # an event of a trigger from before servers=N
            event = {**event, "ready": [event["server"]] if event.get("status") == "ready" else []}
        ready = [ServerInfo.from_dict(s) for s in event.get("ready") or []]
        loading = [ServerInfo.from_dict(s) for s in event.get("loading") or []]
        if event.get("status") == "ready" and ready:
            self._log_ready(ready, loading)
            return fleet_output(ready + loading)
        self._stop_all(
            runtime,
            ready + loading + ([ServerInfo.from_dict(event["server"])] if event.get("server") else []),
        )
        message = event.get("message") or "The Triton server did not become ready."
        raise model_load_failure(message) or ServerStartError(message)

    @staticmethod
    def _stop_all(runtime: TritonRuntime, servers: Sequence[ServerInfo]) -> None:
        for info in servers:
            with contextlib.suppress(Exception):
                runtime.stop(info)

    def _log_ready(self, ready: Sequence[ServerInfo], loading: Sequence[ServerInfo] = ()) -> None:
        for info in ready:
            self.log.info(
                "Triton server %s ready (%s runtime): gRPC %s, metrics %s",
                info.handle.get("server_id"),
                info.runtime,
                info.grpc_url,
                info.metrics_url,
            )
        for info in loading:
            self.log.info(
                "Triton server %s still loading; it joins the run when ready.", info.handle.get("server_id")
            )


class StopTritonServerOperator(BaseOperator):
    """Stop the servers that :class:`StartTritonServerOperator` started. Use it as that task's teardown.

    Before stopping each server it logs what the server did (successful inference requests and model
    executions, from Triton's statistics). Stopping a server that is already gone succeeds and says so.

    :param server: the start task's return value (``start.output``): a fleet or one server.
    :param runtime_options: keyword options of the runtime, as given to the start task.

    Its return value (XCom) is ``True`` when it stopped every server, ``False`` when some were already gone;
    with ``servers=N`` the per-server report lies in the log and in ``report`` of the task's XCom
    ``servers`` key.
    """

    template_fields: Sequence[str] = ("server", "runtime_options")
    ui_color = "#76b900"

    def __init__(
        self, *, server: dict[str, Any] | None, runtime_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.server = server
        self.runtime_options = runtime_options or {}

    def execute(self, context: Any) -> bool:
        release_slot_at_exit()
        servers = fleet_servers(self.server)
        if not servers:
            self.log.info("No server was started for this run: nothing to stop.")
            return False
        runtime = get_runtime(servers[0].runtime, **self.runtime_options)
        report, all_stopped = [], True
        for info in servers:
            work = server_work(info)
            stopped = runtime.stop(info)
            all_stopped &= stopped
            report.append(
                {
                    "server_id": info.handle.get("server_id"),
                    "grpc_url": info.grpc_url,
                    "stopped": stopped,
                    **work,
                }
            )
            self.log.info(
                "%s the Triton server %s at %s (%s).",
                "Stopped" if stopped else "Already gone:",
                info.handle.get("server_id"),
                info.grpc_url,
                f"{work['inference_count']:,} rows, {work['requests']:,} requests, "
                f"{work['executions']:,} batches"
                if work
                else "its statistics could not be read",
            )
        if "ti" in context:
            context["ti"].xcom_push(key="servers", value=report)
        return all_stopped
