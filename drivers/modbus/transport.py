"""Modbus TCP transactions: several requests outstanding on one connection.

pymodbus 3.x clients send one request at a time: its ``TransactionManager``
holds an ``asyncio.Lock`` around every request and keeps a single response
future (the maintainers' stated design, pymodbus PR #2434: "parallel calls
are not permitted"). Modbus TCP itself allows more: each request carries a
16-bit transaction id in its MBAP header, the device echoes it, and a client
may keep several requests outstanding on one connection. ``TcpClient`` is
that client. pymodbus still encodes every request and decodes every answer
(its PDU classes, and ``ModbusClientMixin`` so the driver keeps calling
``read_holding_registers``); what is ours is the connection, the
transaction ids and the window.

How it behaves, and why:

- At most ``window`` transactions are on the wire at once; requests go out
  in the order they were made.
- A request keeps its transaction id across retries: a late answer to the
  first try is an answer to the same question.
- Answers are matched by transaction id and must carry the request's unit
  and function code. An answer nobody waits for any more (its request timed
  out) is dropped, never handed to another request.
- Devices differ in how many requests they take at once; many PLCs accept
  4 to 16, some only one, and the ones that take one misbehave in different
  ways. The window falls to 1 for the life of the client (logged once) when
  the device shows it cannot take concurrent requests:

  * it answers "server device busy" (exception 6) to a request sent while
    others were outstanding;
  * a request sent alongside others got no answer while its neighbours did,
    and the same request sent alone then did (the device ignored, or
    queued, what arrived while it was busy: the connection is marked
    ``stale`` so the caller can start on a fresh one);
  * it closed the connection twice running while several requests were
    outstanding.

  In the first two cases the request is sent again alone at once, so the
  poll that found out still reads everything.
- A request that got no answer raises ``TransactionTimeout``;
  ``link_alive`` says whether the device answered other requests meanwhile
  (one unanswered request) or nothing at all: then the link is dead, the
  connection is closed, and requests still waiting fail at once instead of
  each waiting out its own timeout.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable

from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse

from factory_edge.logs import fields

from .window import Window

log = logging.getLogger(__name__)

DEVICE_BUSY = 6
_MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit + PDU), unit
_MAX_LENGTH = 254  # unit id + the largest PDU (253 bytes)
_REGISTER_ANSWERS: dict[int, type[ModbusPDU]] = {3: ReadHoldingRegistersResponse, 4: ReadInputRegistersResponse}
_WORDS = [struct.Struct(f">{n}H") for n in range(126)]


def _decode_registers(pdu: bytes) -> ModbusPDU | None:
    """The answer to a register read, in one struct call.

    pymodbus decodes registers one ``struct.unpack`` at a time and formats a
    debug line for every answer even when debug logging is off; a 1,000
    register poll spends more time there than on the wire.
    """
    answer = _REGISTER_ANSWERS.get(pdu[0])
    if answer is None or len(pdu) < 2:
        return None
    size = pdu[1]
    if size != len(pdu) - 2 or size % 2 or size > 250:
        return None  # malformed: pymodbus' decoder reports it
    return answer(registers=list(_WORDS[size // 2].unpack_from(pdu, 2)))


class TransactionTimeout(ModbusIOException):
    """No answer to one request after its retries."""

    def __init__(self, request: ModbusPDU, *, link_alive: bool) -> None:
        super().__init__(
            "No response received", request.function_code, transaction_id=request.transaction_id, dev_id=request.dev_id
        )
        self.link_alive = link_alive


class _Transaction:
    __slots__ = ("answer", "answers_before", "on_wire", "request", "shared")

    def __init__(self, request: ModbusPDU, answer: asyncio.Future[ModbusPDU]) -> None:
        self.request = request
        self.answer = answer
        self.on_wire = False
        self.shared = False  # was on the wire at the same time as another request
        self.answers_before: int | None = None  # the client's answer count when it was first sent


class _Connection(asyncio.Protocol):
    """One TCP connection: splits the byte stream into MBAP frames."""

    def __init__(self, client: TcpClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closing = False
        self.outgoing: list[bytes] = []

    def send(self, frame: bytes) -> None:
        """Queue a request; the requests of one event-loop turn leave in one write (one segment, one syscall)."""
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outgoing.append(frame)

    def _flush(self) -> None:
        frames, self.outgoing = self.outgoing, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(frames))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pos = 0
        while len(buffer) - pos >= _MBAP.size:
            tid, protocol, length, unit = _MBAP.unpack_from(buffer, pos)
            if protocol != 0 or not 2 <= length <= _MAX_LENGTH:
                self.client._garbled(self, f"bad MBAP header (protocol {protocol}, length {length})")
                return
            end = pos + 6 + length
            if end > len(buffer):
                break
            pdu = bytes(buffer[pos + _MBAP.size : end])
            pos = end
            self.client._answer(tid, unit, pdu)
        del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self, by_peer=not self.closing)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class TcpClient(ModbusClientMixin[Awaitable[ModbusPDU]]):
    """A Modbus TCP connection keeping up to ``window`` requests outstanding."""

    def __init__(self, host: str, port: int, *, timeout_s: float, retries: int, window: int, name: str) -> None:
        super().__init__()
        self.host, self.port, self.name = host, port, name
        self.timeout_s = timeout_s
        self.retries = retries
        self.configured_window = window
        self.stale = False
        self._window = Window(window)
        self._decoder = DecodePDU(False)
        self._connection: _Connection | None = None
        self._pending: dict[int, _Transaction] = {}
        self._next_tid = 0
        self._answers = 0  # answers matched to a request on this client, ever
        self._closed_while_shared = 0

    # ------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._connection is not None

    @property
    def window(self) -> int:
        """Requests allowed on the wire at once now (the configured value, or 1 once the device showed it needs that)."""
        return self._window.size

    async def connect(self) -> None:
        """Open the connection; raises OSError or TimeoutError as the socket reports them."""
        if self._connection is not None:
            return
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            _, connection = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        self._connection = connection
        self.stale = False

    def close(self) -> None:
        """Close the connection; requests still waiting fail with ConnectionException."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
            self._fail_pending(ConnectionException("connection closed"))

    def _lost(self, connection: _Connection, *, by_peer: bool) -> None:
        if connection is not self._connection:
            return  # an old connection, already closed and replaced
        self._connection = None
        if by_peer and sum(t.on_wire for t in self._pending.values()) > 1 and self.window > 1:
            self._closed_while_shared += 1
            if self._closed_while_shared >= 2:
                self._shrink("the device closed the connection twice running with several requests outstanding")
        self._fail_pending(ConnectionException("connection lost"))

    def _garbled(self, connection: _Connection, reason: str) -> None:
        log.warning("garbled answer, reconnecting", extra=fields(device=self.name, err=reason))
        connection.close()
        if connection is self._connection:
            self._connection = None
            self._fail_pending(ModbusIOException(reason))

    def _fail_pending(self, exc: Exception) -> None:
        for transaction in self._pending.values():
            if not transaction.answer.done():
                transaction.answer.set_exception(exc)

    # ------------------------------------------------------------ requests

    def execute(self, no_response_expected: bool, request: ModbusPDU) -> Awaitable[ModbusPDU]:
        """Send ``request`` and await its answer (the hook ``ModbusClientMixin`` calls)."""
        if no_response_expected:
            raise ValueError("every request of this client expects an answer")
        return self._execute(request)

    def _new_tid(self) -> int:
        while True:
            self._next_tid = self._next_tid % 0xFFFF + 1
            if self._next_tid not in self._pending:
                return self._next_tid

    async def _execute(self, request: ModbusPDU) -> ModbusPDU:
        if self._connection is None:
            raise ConnectionException("not connected")
        loop = asyncio.get_running_loop()
        tid = request.transaction_id = self._new_tid()
        frame = self._frame(request)
        transaction = _Transaction(request, loop.create_future())
        self._pending[tid] = transaction
        alone = probed = False
        tries = 0
        try:
            while True:
                answer = await self._attempt(transaction, frame, alone=alone)
                if answer is not None:
                    if (
                        isinstance(answer, ExceptionResponse)
                        and answer.exception_code == DEVICE_BUSY
                        and transaction.shared
                        and not alone
                    ):
                        self._shrink("the device answered 'busy' with several requests outstanding")
                        transaction.answer = loop.create_future()
                        alone = True
                        continue
                    if probed:
                        self._shrink("the device ignored requests sent while others were outstanding")
                        self.stale = True  # it may still hold what it ignored
                    if transaction.shared:
                        self._closed_while_shared = 0
                    return answer
                answered_meanwhile = self._answers > (transaction.answers_before or 0)
                if transaction.shared and not probed and answered_meanwhile:
                    # Its neighbours were answered, it was not: ask again alone
                    # to tell a device that drops concurrent requests from a
                    # request this device never answers. Not a retry.
                    alone = probed = True
                    continue
                tries += 1
                if tries > self.retries:
                    if not answered_meanwhile:
                        # Nothing came back at all: the link is dead, and what
                        # waits behind this request must not go out on it.
                        self.close()
                    raise TransactionTimeout(request, link_alive=answered_meanwhile)
        finally:
            del self._pending[tid]
            if transaction.answer.done() and not transaction.answer.cancelled():
                transaction.answer.exception()  # retrieved: no "never retrieved" warning
            else:
                transaction.answer.cancel()

    async def _attempt(self, transaction: _Transaction, frame: bytes, *, alone: bool) -> ModbusPDU | None:
        """Send once and wait up to the timeout; None if no answer came."""
        window = self._window
        await window.enter(alone)
        try:
            connection = self._connection
            if connection is None or connection.transport is None:
                raise ConnectionException("connection lost")
            if transaction.answer.done():  # a late answer to an earlier try arrived meanwhile
                return transaction.answer.result()
            others = [t for t in self._pending.values() if t.on_wire]
            if others:
                transaction.shared = True
                for other in others:
                    other.shared = True
            transaction.on_wire = True
            if transaction.answers_before is None:
                transaction.answers_before = self._answers
            connection.send(frame)
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await asyncio.shield(transaction.answer)
            except TimeoutError:
                return None
            finally:
                transaction.on_wire = False
        finally:
            window.leave(alone)

    def _frame(self, request: ModbusPDU) -> bytes:
        pdu = bytes((request.function_code,)) + request.encode()
        return _MBAP.pack(request.transaction_id, 0, len(pdu) + 1, request.dev_id) + pdu

    def _answer(self, tid: int, unit: int, pdu: bytes) -> None:
        transaction = self._pending.get(tid)
        if transaction is None or transaction.answer.done():
            log.debug("answer to no outstanding request dropped", extra=fields(device=self.name, tid=tid))
            return
        request = transaction.request
        decoded = _decode_registers(pdu) or self._decoder.decode(pdu)
        if decoded is None:
            transaction.answer.set_exception(
                ModbusIOException("cannot decode the answer", request.function_code, transaction_id=tid, dev_id=unit)
            )
            return
        if (decoded.function_code & 0x7F) != request.function_code or (request.dev_id and unit != request.dev_id):
            transaction.answer.set_exception(
                ModbusIOException(
                    f"answer to transaction {tid} is function {decoded.function_code & 0x7F} from unit {unit}, "
                    f"the request was function {request.function_code} to unit {request.dev_id}",
                    request.function_code,
                    transaction_id=tid,
                    dev_id=unit,
                )
            )
            return
        decoded.transaction_id = tid
        decoded.dev_id = unit
        self._answers += 1
        transaction.answer.set_result(decoded)

    def _shrink(self, reason: str) -> None:
        if self._window.size == 1:
            return
        self._window.size = 1
        log.warning(
            "device takes one request at a time",
            extra=fields(
                device=self.name,
                reason=reason,
                max_concurrent_requests=self.configured_window,
                hint="set max_concurrent_requests: 1 for this device",
            ),
        )
