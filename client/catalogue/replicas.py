"""The generator replicas a catalogue job sends to: one channel each, at most `per_replica` requests in
flight on each, and a replica that answered UNAVAILABLE rested (a circuit breaker) so that the retry goes
to another one.

Why not the channel's round_robin policy alone: it spreads calls, but it cannot bound what is in flight
on one replica, and a retry may land on the replica that just failed. A target that names replicas
(`dns:///generator-headless:50051`, `ipv4:a:1,b:2`) is resolved to its addresses, and again every
`refresh_s`, so pods that scale in join a running job and pods that left are dropped. A plain
`host:port` is one replica, dialled by its name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from client.api import GeneratorClient
from client.balancing import replica_addresses, split_target
from client.channel import ChannelSecurity

log = logging.getLogger(__name__)


@dataclass
class Replica:
    address: str
    client: GeneratorClient
    in_flight: int = 0
    sent: int = 0
    failures: int = 0  # UNAVAILABLE answers in a row
    resting_until: float = 0.0  # monotonic: not chosen before then

    def ready(self, now: float, per_replica: int) -> bool:
        # After a rest, one request probes the replica; the others wait for its answer.
        room = 1 if self.failures else per_replica
        return self.in_flight < room and self.resting_until <= now


class Replicas:
    """Leases a replica per request: the least busy one that is not resting, waiting while all are full."""

    def __init__(
        self,
        target: str,
        security: ChannelSecurity | None = None,
        per_replica: int = 4,
        refresh_s: float = 30.0,
        rest_s: float = 2.0,
        max_rest_s: float = 60.0,
    ):
        self.target = target
        self.security = security or ChannelSecurity()
        self.per_replica = max(1, per_replica)
        self.refresh_s = refresh_s
        self.rest_s = rest_s
        self.max_rest_s = max_rest_s
        scheme, pairs = split_target(target)
        # Only a target that names replicas is split; a host name's own addresses (IPv4 and IPv6) are one server.
        self._splits = target.startswith(("dns:", "ipv4:", "ipv6:"))
        # Certificates name the service, not the pod's IP: verify against the name the target used.
        self._tls_name = pairs[0][0] if pairs and self.security.tls and scheme == "dns" else ""
        self._replicas: dict[str, Replica] = {}
        self._resolved_at = -float("inf")
        self._changed = asyncio.Condition()

    @property
    def addresses(self) -> list[str]:
        return list(self._replicas)

    def capacity(self) -> int:
        """Requests that may be in flight now: `per_replica` on each known replica (at least one's worth)."""
        return self.per_replica * max(1, len(self._replicas))

    async def refresh(self) -> None:
        """Resolve the target again: new addresses join, addresses gone (and idle) leave."""
        self._resolved_at = time.monotonic()
        addresses = await replica_addresses(self.target) if self._splits else [self.target]
        if not addresses:
            log.warning("%s resolved to no address; keeping %s", self.target, self.addresses)
            return
        for address in addresses:
            if address not in self._replicas:
                options = [("grpc.ssl_target_name_override", self._tls_name)] if self._tls_name else None
                client = GeneratorClient(address, self.security, options=options)
                self._replicas[address] = Replica(address, client)
        for address in [a for a in self._replicas if a not in addresses]:
            if self._replicas[address].in_flight == 0:
                await self._replicas.pop(address).client.close()
        async with self._changed:
            self._changed.notify_all()

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Replica]:
        """A replica with room for one more request, held until the block ends."""
        if time.monotonic() - self._resolved_at > self.refresh_s:
            await self.refresh()
        async with self._changed:
            while True:
                now = time.monotonic()
                ready = [r for r in self._replicas.values() if r.ready(now, self.per_replica)]
                if ready:
                    break
                # All full (a lease ends and notifies) or resting (wake when the first rest ends).
                rests = [r.resting_until - now for r in self._replicas.values() if r.resting_until > now]
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(rests) if rests else None)
                except TimeoutError:
                    pass
            replica = min(ready, key=lambda r: (r.in_flight, r.sent))
            replica.in_flight += 1
            replica.sent += 1
        try:
            yield replica
        finally:
            replica.in_flight -= 1
            async with self._changed:
                self._changed.notify_all()

    def rest(self, replica: Replica) -> None:
        """The replica answered UNAVAILABLE: send elsewhere for a while, twice as long each time in a row."""
        replica.failures += 1
        replica.resting_until = time.monotonic() + min(self.rest_s * 2 ** (replica.failures - 1), self.max_rest_s)

    def answered(self, replica: Replica) -> None:
        """The replica answered (an image, or any status but UNAVAILABLE): it takes its full share again."""
        replica.failures = 0
        replica.resting_until = 0.0

    async def close(self) -> None:
        for replica in self._replicas.values():
            await replica.client.close()
        self._replicas.clear()
