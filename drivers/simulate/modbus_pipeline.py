"""A pymodbus TCP server that answers pipelined requests, as a capable PLC does.

pymodbus' own server handles one request per TCP segment and keeps the
request being served in one attribute, so a client with several requests
outstanding gets some answered, some not, some twice (a device that can take
only one request at a time; ``ModbusSimulator(pipelining=False)`` keeps that
behaviour for tests). This handler takes every request of a segment and
answers each in its own task, from the same pymodbus datastore, so answers
leave in the order they are ready, not the order requests came: what a test
needs to see transaction ids matter.

``Faults`` lets a test make some requests slow or unanswered, and cap the
requests served at once (beyond it the device answers "server device busy").
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException, NoSuchIdException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.transaction import TransactionManager

from factory_edge.logs import fields

from ..config import Table

log = logging.getLogger(__name__)

TABLE_OF_FC = {
    1: Table.COIL,
    5: Table.COIL,
    15: Table.COIL,
    2: Table.DISCRETE,
    3: Table.HOLDING,
    6: Table.HOLDING,
    16: Table.HOLDING,
    23: Table.HOLDING,
    4: Table.INPUT,
}


@dataclass
class Faults:
    """How the simulated device misbehaves: slow or silent address ranges, a cap on concurrent requests."""

    delays: list[tuple[Table, range, float | None]] = field(default_factory=list)
    max_outstanding: int | None = None

    def delay(self, table: Table, addresses: range, seconds: float | None) -> None:
        """Answer requests touching ``addresses`` after ``seconds``; None: never answer them."""
        self.delays.append((table, addresses, seconds))

    def delay_for(self, pdu: ModbusPDU) -> float | None:
        table = TABLE_OF_FC.get(pdu.function_code)
        start = getattr(pdu, "address", 0)
        end = start + max(1, getattr(pdu, "count", 1))
        wait = 0.0
        for fault_table, addresses, seconds in self.delays:
            if fault_table is table and addresses.start < end and start < addresses.stop:
                if seconds is None:
                    return None
                wait = max(wait, seconds)
        return wait


class _PipelinedHandler(ServerRequestHandler):
    """One client connection: every complete request is answered on its own."""

    def __init__(self, owner: PipelinedTcpServer, *args: Any) -> None:
        super().__init__(owner, *args)
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = 0

    def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
        used = 0
        while used < len(data):
            try:
                size = TransactionManager.callback_data(self, data[used:], addr)
            except ModbusIOException:
                # pymodbus answers an undecodable request "illegal function".
                return used + super().callback_data(data[used:], addr)
            if not size:
                break
            used += size
            pdu, self.last_pdu = self.last_pdu, None
            if pdu is not None:
                task = self.loop.create_task(self._answer(pdu, addr), name="simulate[modbus answer]")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return used

    async def _answer(self, pdu: ModbusPDU, addr: tuple | None) -> None:
        server: PipelinedTcpServer = self.server
        faults = server.faults
        if faults.max_outstanding is not None and self._serving >= faults.max_outstanding:
            response: ModbusPDU = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_BUSY)
        else:
            wait = faults.delay_for(pdu)
            if wait is None:
                return  # a request this device never answers
            if not server.serves_unit(pdu.dev_id):
                # What a Modbus TCP gateway answers for a unit id behind it that does not respond
                # (pymodbus' SimCore would fail with a KeyError instead).
                server.unknown_unit(pdu.dev_id)
                self.server_send(
                    _answer_with(pdu, ExceptionResponse(pdu.function_code, ExcCodes.GATEWAY_NO_RESPONSE)), addr
                )
                return
            self._serving += 1
            try:
                if wait:
                    await asyncio.sleep(wait)
                response = await pdu.datastore_update(server.context, pdu.dev_id)  # type: ignore[arg-type]  # SimCore serves as a context
            except NoSuchIdException:
                if server.ignore_missing_devices:
                    return
                response = ExceptionResponse(pdu.function_code, ExcCodes.GATEWAY_NO_RESPONSE)
            except Exception:
                log.exception("simulated device failed a request")
                response = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE)
            finally:
                self._serving -= 1
        response.transaction_id = pdu.transaction_id
        response.dev_id = pdu.dev_id
        self.server_send(response, addr)

    def server_send(self, pdu: ModbusPDU, addr: tuple | None) -> None:
        # Not pymodbus' send(): it empties the receive buffer, losing the
        # start of a request that arrived while this answer was prepared.
        if pdu is None or self.transport is None:
            return
        packet = self.framer.buildFrame(self.trace_pdu(True, pdu))
        self.transport.write(self.trace_packet(True, packet))  # type: ignore[attr-defined]


def _answer_with(request: ModbusPDU, response: ModbusPDU) -> ModbusPDU:
    response.transaction_id = request.transaction_id
    response.dev_id = request.dev_id
    return response


class PipelinedTcpServer(ModbusTcpServer):
    """pymodbus' TCP server with a handler that answers several outstanding requests."""

    def __init__(self, *args: Any, faults: Faults, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = faults
        self.handlers: list[_PipelinedHandler] = []
        self._unknown_units: set[int] = set()

    def serves_unit(self, unit: int) -> bool:
        devices = getattr(self.context, "devices", None)  # SimCore: unit id -> simulated device
        return devices is None or unit in devices or 0 in devices

    def unknown_unit(self, unit: int) -> None:
        """Say once per unit id that no simulated machine has it (the client reads "gateway target failed to respond")."""
        if unit not in self._unknown_units:
            self._unknown_units.add(unit)
            units = ", ".join(str(u) for u in sorted(getattr(self.context, "devices", {})))
            log.warning("no simulated machine with this unit id", extra=fields(unit=unit, units=units))

    def callback_new_connection(self) -> _PipelinedHandler:
        handler = _PipelinedHandler(self, self.trace_packet, self.trace_pdu, self.trace_connect)
        self.handlers = [h for h in self.handlers if h.transport is not None] + [handler]
        return handler

    async def shutdown(self) -> None:
        # pymodbus can forget a client's transport without closing it (a client that leaves while an answer
        # is being prepared); close every one still open, so no socket outlives the server.
        for handler in self.handlers:
            for task in list(handler._tasks):
                task.cancel()
            if handler.transport is not None:
                handler.transport.close()
        self.handlers.clear()
        await super().shutdown()
