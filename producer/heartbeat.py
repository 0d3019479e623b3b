"""The producer's liveness key: a ProducerHeartbeat (state, version, recent rates) SET with a TTL, so
``gspo status`` lists live producers and a dead one disappears by itself."""

from __future__ import annotations

import socket
import time

from common.keys import RunKeys
from common.streams import StreamClient
from common.wire import ProducerHeartbeat, encode
from producer.engines.base import Engine
from producer.metrics import ProducerMetrics


class Heartbeat:
    def __init__(
        self,
        streams: StreamClient,
        keys: RunKeys,
        producer_id: str,
        engine: Engine,
        metrics: ProducerMetrics,
        ttl_s: float,
    ):
        self.streams, self.key, self.id = streams, keys.producer(producer_id), producer_id
        self.engine, self.metrics = engine, metrics
        self.ttl_s = ttl_s
        self.every_s = min(2.0, ttl_s / 3)  # written well within its TTL
        self.started_at = time.time()
        self._rate_mark = (time.monotonic(), 0, 0)  # (t, tokens, groups) at the previous heartbeat

    def make(self, state: str, inflight: int) -> ProducerHeartbeat:
        """The heartbeat now; its rates are over the time since the previous one."""
        now, m = time.monotonic(), self.metrics
        t, tokens, groups = self._rate_mark
        dt = max(now - t, 1e-6)
        self._rate_mark = (now, m.tokens_total, m.groups_total)
        return ProducerHeartbeat(
            producer_id=self.id,
            host=socket.gethostname(),
            engine=self.engine.name,
            version=self.engine.version,
            groups_done=m.groups_total,
            tokens_per_s=(m.tokens_total - tokens) / dt,
            groups_per_s=(m.groups_total - groups) / dt,
            inflight=inflight,
            state=state,
            started_at=self.started_at,
        )

    async def write(self, hb: ProducerHeartbeat) -> None:
        ttl = max(1, int(self.ttl_s))
        await self.streams.call(lambda: self.streams.redis.set(self.key, encode(hb), ex=ttl), "SET heartbeat")

    async def remove(self) -> None:
        """Deregister (a clean exit): ``gspo status`` stops listing this producer at once."""
        await self.streams.call(lambda: self.streams.redis.delete(self.key), "DEL heartbeat")
