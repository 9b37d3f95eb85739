"""Triton system shared memory for a server on the same host: tensors skip gRPC serialisation.

One region holds everything: it is registered with the server once when the chunk starts (a region per
slot and per buffer took 11 registrations and as many unregistrations, 25–35 ms of client CPU a chunk
against 10–17), and unregistered and unlinked when the chunk ends, whatever happened. Requests carry only
references into it (offset and size):

- read buffers: a read of the chunk (a few requests' worth) is encoded straight into one, and its
  requests point into it, with no copy; it is free again once they are all answered;
- slots, one per request in flight: room the server writes the outputs into, and room for the input
  tensors that are not in a read buffer (rows left after some were set aside, the halves of a request
  split to find a row the server refuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import mmap
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from airflow_batch_infer.client.tensors import TRITON_NUMPY, InputBinding, OutputBinding, row_bytes
from airflow_batch_infer.processes import pid_alive

log = logging.getLogger(__name__)
REGION_PREFIX = "abi_"
SHM_DIR = Path("/dev/shm")  # noqa: S108  # where Linux keeps POSIX shared memory objects (shm_open)
ALIGN = 64  # bytes: every tensor's place in the region starts on a cache line


def server_is_local(url: str) -> bool:
    """Whether ``host:port`` points at this machine (loopback, or one of this host's own names)."""
    host = url.rsplit(":", 1)[0].strip("[]")
    if host in {"localhost", socket.gethostname(), socket.getfqdn()}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remove_orphaned_regions(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the regions of client processes that are gone (a task killed mid-chunk cannot clean up).

    Regions are named ``abi_<pid>_...`` after the process that made them.
    """
    removed = []
    for region in shm_dir.glob(f"{REGION_PREFIX}*_*") if shm_dir.is_dir() else []:
        pid = region.name[len(REGION_PREFIX) :].split("_", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            region.unlink(missing_ok=True)
            removed.append(region.name)
    if removed:
        log.info("Removed %d shared memory region(s) of client processes that are gone.", len(removed))
    return removed


def supports_shared_memory(inputs: Sequence[InputBinding], outputs: Sequence[OutputBinding]) -> bool:
    """Shared memory needs fixed-size tensors: no BYTES, no variable widths."""
    bindings = [*inputs, *outputs]
    return all(b.datatype != "BYTES" and b.width > 0 for b in bindings)


class _Region:
    """One POSIX shared memory object, created and mapped here, that the server maps by its key.

    Made as a file in ``/dev/shm``, which is what ``shm_open`` does on Linux, rather than with
    ``tritonclient.utils.shared_memory``. That goes through ``multiprocessing.shared_memory``, which
    (before Python 3.13) starts multiprocessing's resource tracker: a second Python interpreter per task
    process, about 80 ms of CPU. Regions of a killed task are removed by :func:`remove_orphaned_regions`.

    :param name: the region's name, also its key (``/<name>``) and its file's name.
    :param byte_size: its size.
    :param shm_dir: where shared memory objects live.
    """

    def __init__(self, name: str, byte_size: int, shm_dir: Path = SHM_DIR) -> None:
        self.name = name
        self.byte_size = byte_size
        self.path = shm_dir / name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, byte_size)
            self._map: mmap.mmap | None = mmap.mmap(fd, byte_size)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    @property
    def key(self) -> str:
        """The key the server opens the region by (``shm_open``'s name)."""
        return f"/{self.name}"

    def array(self, dtype: np.dtype, shape: Sequence[int], offset: int) -> np.ndarray:
        """An array over the region's memory at ``offset``: no copy.

        ``np.frombuffer`` holds the map's buffer for as long as the array (or a view of it) lives, so the
        map cannot be closed under it (``np.ndarray(buffer=...)`` does not: a later read would crash).
        """
        if self._map is None:
            raise ValueError(f"Shared memory region {self.name} is closed.")
        # math.prod, not np.prod: a numpy reduction's set-up costs more than a request's other arithmetic.
        return np.frombuffer(self._map, dtype, int(math.prod(shape)), offset).reshape(shape)

    def destroy(self) -> None:
        """Unlink the region and unmap it here (once the last array over it is gone, if some still are)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._map is not None:
            with contextlib.suppress(BufferError):  # arrays over it: the map closes when they are freed
                self._map.close()
            self._map = None


@dataclass
class Slot:
    """The shared memory of one request in flight: its inputs' and its outputs' places in the region."""

    region: _Region
    input_offsets: dict[str, int] = field(default_factory=dict)
    output_offsets: dict[str, int] = field(default_factory=dict)
    input_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """Each input tensor's place in the input region, ``[rows, width]``."""


@dataclass
class ReadBuffer:
    """Shared memory a whole read of the chunk is encoded into; its requests point into it, no copy."""

    region: _Region
    offsets: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """Each input tensor's place in the region, ``[rows, width]``."""


class SharedMemoryPool:
    """Slots and read buffers in one region of system shared memory, registered with the server for the
    length of one chunk.

    :param client: the asyncio gRPC client (registration goes through it).
    :param inputs: input bindings (fixed-size datatypes only).
    :param outputs: output bindings (fixed-size datatypes only).
    :param rows: most rows one request carries.
    :param slots: requests in flight at once.
    :param headers: headers sent with the registration calls.
    :param read_rows: rows of one read buffer (a read of the chunk, encoded in place).
    :param read_buffers: read buffers; none by default.
    """

    def __init__(
        self,
        client: aioclient.InferenceServerClient,
        inputs: Sequence[InputBinding],
        outputs: Sequence[OutputBinding],
        rows: int,
        slots: int,
        headers: dict[str, str] | None = None,
        read_rows: int = 0,
        read_buffers: int = 0,
    ) -> None:
        self.client = client
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.rows = rows
        self.slot_count = slots
        self.headers = headers
        self.read_rows = read_rows
        self.read_buffer_count = read_buffers if read_rows > 0 else 0
        self._registering = asyncio.Lock()
        self._free: asyncio.Queue[Slot] = asyncio.Queue()
        self._free_reads: asyncio.Queue[ReadBuffer] = asyncio.Queue()
        self._slots: list[Slot] = []
        self._reads: list[ReadBuffer] = []
        self._regions: list[_Region] = []
        self._prefix = f"{REGION_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"

    async def _region(self, name: str, byte_size: int) -> _Region:
        region = _Region(name, byte_size)
        self._regions.append(region)
        await self.client.register_system_shared_memory(name, region.key, byte_size, headers=self.headers)
        return region

    def _layout(
        self, bindings: Sequence[InputBinding | OutputBinding], rows: int, start: int
    ) -> tuple[dict[str, int], int]:
        """Offsets of each tensor of ``rows`` rows laid out from ``start``, and the offset after them."""
        offsets: dict[str, int] = {}
        for b in bindings:
            offsets[b.tensor] = start
            start += -(-row_bytes(b) * rows // ALIGN) * ALIGN
        return offsets, start

    def _input_arrays(self, region: _Region, offsets: dict[str, int], rows: int) -> dict[str, np.ndarray]:
        """An array ``[rows, width]`` over each input tensor's place in ``region``."""
        return {
            b.tensor: region.array(np.dtype(TRITON_NUMPY[b.datatype]), [rows, b.width], offsets[b.tensor])
            for b in self.inputs
        }

    async def ensure_registered(self) -> None:
        """Register again the regions a restarted server no longer knows (it forgets them all).

        Requests in flight all find out about a restart at once: one of them registers, the others wait
        for it and then find every region known.
        """
        async with self._registering:
            status = await self.client.get_system_shared_memory_status(headers=self.headers, as_json=True)
            known = set((status or {}).get("regions", {}))  # a map: region name → its status
            for region in self._regions:
                if region.name in known:
                    continue
                try:
                    await self.client.register_system_shared_memory(
                        region.name, region.key, region.byte_size, headers=self.headers
                    )
                except InferenceServerException as error:
                    # Names are this pool's own (pid and a random part): one already known is this region.
                    if "ALREADY_EXISTS" not in str(error.status()):
                        raise
                log.warning("Registered shared memory region %s again with the server.", region.name)

    async def __aenter__(self) -> SharedMemoryPool:
        remove_orphaned_regions()
        slots, reads, end = [], [], 0
        for _ in range(self.slot_count):
            input_offsets, end = self._layout(self.inputs, self.rows, end)
            output_offsets, end = self._layout(self.outputs, self.rows, end)
            slots.append((input_offsets, output_offsets))
        for _ in range(self.read_buffer_count):
            offsets, end = self._layout(self.inputs, self.read_rows, end)
            reads.append(offsets)
        try:
            region = await self._region(f"{self._prefix}_pool", end)
            for input_offsets, output_offsets in slots:
                slot = Slot(region, input_offsets, output_offsets)
                slot.input_arrays = self._input_arrays(region, input_offsets, self.rows)
                self._slots.append(slot)
                self._free.put_nowait(slot)
            for offsets in reads:
                buffer = ReadBuffer(region, offsets, self._input_arrays(region, offsets, self.read_rows))
                self._reads.append(buffer)
                self._free_reads.put_nowait(buffer)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Unregister every region from the server and unlink it here."""
        for slot in self._slots:
            slot.input_arrays.clear()  # a region cannot be unmapped while arrays over it are alive
        for buffer in self._reads:
            buffer.arrays.clear()
        self._slots.clear()
        self._reads.clear()
        for region in self._regions:
            try:
                await self.client.unregister_system_shared_memory(region.name, headers=self.headers)
            except (InferenceServerException, asyncio.CancelledError, OSError) as error:
                log.warning("Could not unregister shared memory region %s: %s", region.name, error)
            try:
                region.destroy()
            except Exception as error:  # a region that cannot be unlinked must not hide the real error
                log.warning("Could not remove shared memory region %s: %s", region.name, error)
        self._regions.clear()

    async def acquire(self) -> Slot:
        return await self._free.get()

    def release(self, slot: Slot) -> None:
        self._free.put_nowait(slot)

    async def acquire_read(self) -> ReadBuffer:
        """A read buffer no request points into any more."""
        return await self._free_reads.get()

    def release_read(self, buffer: ReadBuffer) -> None:
        self._free_reads.put_nowait(buffer)

    def _place_in_reads(self, tensor: str, values: np.ndarray) -> tuple[str, int] | None:
        """``(region, offset)`` when ``values`` lie whole and contiguous in a read buffer, else ``None``."""
        if not values.flags.c_contiguous:
            return None
        start = values.__array_interface__["data"][0]
        for buffer in self._reads:
            base = buffer.arrays.get(tensor)
            if base is None or base.dtype != values.dtype or base.shape[1:] != values.shape[1:]:
                continue
            base_start = base.__array_interface__["data"][0]
            if base_start <= start and start + values.nbytes <= base_start + base.nbytes:
                return buffer.region.name, buffer.offsets[tensor] + start - base_start
        return None

    def request(
        self, slot: Slot, tensors: dict[str, np.ndarray]
    ) -> tuple[list[InferInput], list[InferRequestedOutput]]:
        """Inputs that point at ``tensors`` where they lie in a read buffer, else at a copy in ``slot``, and
        outputs that point at ``slot``."""
        infer_inputs = []
        rows = 0
        for binding in self.inputs:
            values = tensors[binding.tensor]
            rows = values.shape[0]
            placed = self._place_in_reads(binding.tensor, values)
            if placed is None:
                place = slot.input_arrays[binding.tensor][:rows]
                place[...] = values
                placed = slot.region.name, slot.input_offsets[binding.tensor]
            item = InferInput(binding.tensor, list(values.shape), binding.datatype)
            item.set_shared_memory(placed[0], values.nbytes, offset=placed[1])
            infer_inputs.append(item)
        requested = []
        for binding in self.outputs:
            item = InferRequestedOutput(binding.tensor)
            item.set_shared_memory(
                slot.region.name, rows * row_bytes(binding), offset=slot.output_offsets[binding.tensor]
            )
            requested.append(item)
        return infer_inputs, requested

    def outputs_of(self, slot: Slot, rows: int) -> dict[str, np.ndarray]:
        """Copy the outputs of the request that just completed out of ``slot``."""
        return {
            b.tensor: slot.region.array(
                np.dtype(TRITON_NUMPY[b.datatype]), [rows, b.width], slot.output_offsets[b.tensor]
            ).copy()
            for b in self.outputs
        }
