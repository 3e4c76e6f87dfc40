"""grpc.health.v1 for certkv: Check, Watch and List over one status table.

Watch streams are bounded: at most `max_watch_per_peer` are open per peer address (RESOURCE_EXHAUSTED beyond:
Watch needs no token, so the peer is the only identity), and every Watch stream ends, after sending NOT_SERVING,
when draining starts (the drain waits a moment for them before it stops the server), so an idle watcher never
holds a drain. After enter_graceful_shutdown() every service is
NOT_SERVING for good and set() is ignored (as in grpcio-health-checking). Writes never hold a lock, so a watcher that
does not read cannot delay a status change.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.security import peer_address

SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, max_watch_per_peer: int = 8):
        self.max_watch_per_peer = max_watch_per_peer
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()  # set and replaced on every change
        self._closing = False
        self._watchers: Counter[str] = Counter()
        self._unwatched = asyncio.Event()  # set while no Watch stream is open
        self._unwatched.set()

    @property
    def watchers(self) -> int:
        return sum(self._watchers.values())

    async def set(self, service: str, status: int) -> None:
        if not self._closing:
            self._status[service] = status
            self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; open Watch streams send it and end."""
        for service in self._status:
            self._status[service] = NOT_SERVING
        self._closing = True
        self._notify()

    async def watchers_gone(self, timeout: float) -> None:
        """Waits (at most `timeout`) until every Watch stream has ended, e.g. after enter_graceful_shutdown()."""
        try:
            await asyncio.wait_for(self._unwatched.wait(), timeout)
        except TimeoutError:
            pass

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._status.items()})

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        peer = peer_address(context.peer())
        if self._watchers[peer] >= self.max_watch_per_peer:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"at most {self.max_watch_per_peer} health Watch streams per peer "
                                "(--max-watch-per-peer)")
        self._watchers[peer] += 1
        self._unwatched.clear()
        try:
            await self._watch(request.service, context)
        finally:
            self._watchers[peer] -= 1
            if not self._watchers[peer]:
                del self._watchers[peer]
            if not self._watchers:
                self._unwatched.set()

    async def _watch(self, service: str, context) -> None:
        last = None
        while True:
            changed = self._changed  # taken before the status is read: no change can slip in between
            status = self._status.get(service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._closing:
                return
            await changed.wait()
