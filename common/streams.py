"""The only module that issues Redis stream commands (docs/architecture.md, "Streams and keys").

- groups are created idempotently (only BUSYGROUP is tolerated);
- XADD carries an approximate MAXLEN (a safety cap; admission control keeps backlogs far below it);
- XREADGROUP / XACK / XAUTOCLAIM / XPENDING wrappers return plain ``Entry`` objects;
- XAUTOCLAIM replies of Redis 6.2 (2 elements) and 7.x (3 elements, with deleted ids) are both handled;
- dead-lettering copies the original bytes with the reason to the dead stream, then acks;
- connection errors (and only those) are retried with exponential backoff for ``retry_for_s``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.wire import DeadLetter, encode

log = logging.getLogger(__name__)
FIELD = b"m"  # every entry holds one field: the msgpack message
T = TypeVar("T")
# redis-py wraps socket failures in these two; nothing else is retried (docs/architecture.md, "Streams and keys")
RETRYABLE = (RedisConnectionError, RedisTimeoutError)


def describe_failure(e: BaseException) -> str:
    """One log line for a service's fatal error: Redis auth/outage named as such, else the message."""
    if isinstance(e, AuthenticationError):
        return f"Redis refused the credentials: {e}"
    if isinstance(e, RETRYABLE):
        return f"Redis unreachable for longer than redis.retry_for_s: {type(e).__name__}: {e}"
    return " ".join(str(e).split())


@dataclass(frozen=True)
class Entry:
    id: str
    payload: bytes | None  # None: the entry was trimmed/deleted while pending
    deliveries: int = 1


def _sid(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _entry(raw_id, fields) -> Entry:
    if fields is None:
        return Entry(_sid(raw_id), None)
    payload = fields.get(FIELD) if isinstance(fields, dict) else None
    if payload is None and isinstance(fields, dict):
        payload = fields.get(FIELD.decode())
    return Entry(_sid(raw_id), payload if payload is not None else b"")


class StreamClient:
    """Async stream operations with connection-error retry. One per process is enough."""

    def __init__(self, client: aioredis.Redis, retry_for_s: float = 120.0, what: str = "redis"):
        self.redis = client
        self.retry_for_s = retry_for_s
        self.what = what
        self.retries = 0  # connection errors survived (a metric)

    async def call(self, fn: Callable[[], Awaitable[T]], op: str) -> T:
        """Run ``fn`` retrying connection errors with capped exponential backoff and jitter."""
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.05
        while True:
            try:
                return await fn()
            except RETRYABLE as e:
                if isinstance(e, AuthenticationError) or time.monotonic() >= deadline:
                    raise
                self.retries += 1
                log.warning("%s: %s failed (%s); retrying in %.2fs", self.what, op, type(e).__name__, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------------ groups
    async def ensure_group(self, stream: str, group: str, start_id: str = "0") -> bool:
        """Create ``group`` on ``stream`` (and the stream) unless it exists. True if created."""

        async def go() -> bool:
            try:
                await self.redis.xgroup_create(stream, group, id=start_id, mkstream=True)
                return True
            except ResponseError as e:
                if "BUSYGROUP" in str(e):
                    return False
                raise

        return await self.call(go, f"XGROUP CREATE {stream} {group}")

    # ------------------------------------------------------------------ writes
    async def append(self, stream: str, payload: bytes, maxlen: int | None) -> str:
        async def go():
            return await self.redis.xadd(stream, {FIELD: payload}, maxlen=maxlen, approximate=True)

        return _sid(await self.call(go, f"XADD {stream}"))

    async def append_many(self, stream: str, payloads: Iterable[bytes], maxlen: int | None) -> list[str]:
        """Pipelined XADDs (one round trip)."""
        payloads = list(payloads)

        async def go():
            pipe = self.redis.pipeline(transaction=False)
            for p in payloads:
                pipe.xadd(stream, {FIELD: p}, maxlen=maxlen, approximate=True)
            return await pipe.execute()

        return [_sid(x) for x in await self.call(go, f"XADD {stream} x{len(payloads)}")]

    # ------------------------------------------------------------------ reads
    async def read(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int | None
    ) -> list[Entry]:
        """New entries for ``consumer`` (``>``); ``block_ms=None`` does not block."""

        async def go():
            try:
                return await self.redis.xreadgroup(
                    group, consumer, {stream: ">"}, count=count, block=block_ms
                )
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # the stream or group vanished (e.g. a Redis restart without persistence): recreate and go on
                log.warning("%s: group %s on %s is missing; recreating it", self.what, group, stream)
                await self.ensure_group(stream, group)
                return []

        return self._entries(await self.call(go, f"XREADGROUP {stream}"))

    async def read_own_pending(
        self, stream: str, group: str, consumer: str, count: int, after: str = "0"
    ) -> list[Entry]:
        """Entries delivered to ``consumer`` but not acked (its own history), oldest first, after ``after``."""

        async def go():
            return await self.redis.xreadgroup(group, consumer, {stream: after}, count=count)

        return self._entries(await self.call(go, f"XREADGROUP {stream} (pending)"))

    @staticmethod
    def _entries(reply) -> list[Entry]:
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3 shape, if a caller configured it
            items = next(iter(reply.values()))
            if items and isinstance(items[0], list) and len(items[0]) == 1:
                items = items[0]
        else:
            items = reply[0][1]
        return [_entry(i, f) for i, f in items]

    async def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 16, start: str = "0-0"
    ) -> tuple[list[Entry], list[str], str]:
        """Take over entries idle for ``min_idle_ms``. Returns (claimed, deleted ids, next cursor).

        Redis 6.2 replies ``[cursor, entries]`` with a nil in place of each claimed entry that was deleted
        (no id: those are found in our own PEL and stay there until the caller acks them); 7.x replies
        ``[cursor, entries, deleted_ids]`` and drops those from the PEL itself. Both end up as ``deleted``:
        acking them is correct on both.
        """

        async def go():
            return await self.redis.xautoclaim(
                stream, group, consumer, min_idle_ms, start_id=start, count=count
            )

        reply = await self.call(go, f"XAUTOCLAIM {stream}")
        cursor = _sid(reply[0])
        raw = list(reply[1] or [])
        entries = [_entry(i, f) for i, f in raw if i is not None]
        deleted = [_sid(x) for x in reply[2]] if len(reply) > 2 and reply[2] else []
        deleted += [e.id for e in entries if e.payload is None]
        if any(i is None for i, _ in raw):
            # 6.2 replies nil (no id) for a claimed entry that was deleted; it now sits in our PEL: find it there
            gone = await self._gone_from_own_pel(stream, group, consumer, start, cursor, count)
            deleted += [i for i in gone if i not in set(deleted)]
        return [e for e in entries if e.payload is not None], deleted, cursor

    async def _gone_from_own_pel(
        self, stream: str, group: str, consumer: str, start: str, cursor: str, count: int
    ) -> list[str]:
        """Ids pending for ``consumer`` in the scanned range [start, cursor) whose entries no longer exist."""
        end = "+" if cursor == "0-0" else f"({cursor}"

        async def go() -> list[str]:
            rows = await self.redis.xpending_range(
                stream, group, min=start, max=end, count=max(4 * count, 100), consumername=consumer
            )
            ids = [_sid(r["message_id"]) for r in rows]
            pipe = self.redis.pipeline(transaction=False)
            for i in ids:
                pipe.xrange(stream, min=i, max=i, count=1)
            found = await pipe.execute() if ids else []
            return [i for i, hit in zip(ids, found, strict=True) if not hit]

        return await self.call(go, f"XPENDING {stream} {consumer}")

    # ------------------------------------------------------------------ acks, dead letters
    async def ack(self, stream: str, group: str, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0

        async def go():
            n = 0
            for i in range(0, len(ids), 1000):
                n += await self.redis.xack(stream, group, *ids[i : i + 1000])
            return n

        return await self.call(go, f"XACK {stream} x{len(ids)}")

    async def dead_letter(
        self,
        dead_stream: str,
        source_stream: str,
        group: str,
        entry: Entry,
        reason: str,
        detail: str,
        consumer: str,
        maxlen: int,
    ) -> None:
        """Copy the original bytes with the reason to the dead stream, then ack the source entry."""
        letter = DeadLetter(
            source_stream=source_stream,
            entry_id=entry.id,
            reason=reason,
            detail=detail[:2000],
            payload=entry.payload or b"",
            consumer=consumer,
        )
        await self.append(dead_stream, encode(letter), maxlen)
        await self.ack(source_stream, group, [entry.id])
        log.warning("dead-lettered %s %s: %s: %s", source_stream, entry.id, reason, detail[:300])

    # ------------------------------------------------------------------ inspection and trimming
    async def length(self, stream: str) -> int:
        return int(await self.call(lambda: self.redis.xlen(stream), f"XLEN {stream}"))

    async def pending_count(self, stream: str, group: str) -> int:
        async def go():
            try:
                info = await self.redis.xpending(stream, group)
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    return 0
                raise
            return int(info["pending"] if isinstance(info, dict) else info[0])

        return await self.call(go, f"XPENDING {stream}")

    async def oldest_pending(self, stream: str, group: str) -> str | None:
        """The id of ``group``'s oldest pending entry; None when nothing is pending (or no such group)."""

        async def go():
            try:
                info = await self.redis.xpending(stream, group)
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    return None
                raise
            oldest = info.get("min") if isinstance(info, dict) else info[1]
            return None if oldest is None else _sid(oldest)

        return await self.call(go, f"XPENDING {stream}")

    async def group_info(self, stream: str) -> list[dict]:
        """XINFO GROUPS as dicts with str keys; ``lag``/``entries-read`` exist only on Redis >= 7."""

        async def go():
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError as e:
                if "no such key" in str(e).lower():
                    return []
                raise
            return [{_sid(k): (_sid(v) if isinstance(v, bytes) else v) for k, v in g.items()} for g in groups]

        return await self.call(go, f"XINFO GROUPS {stream}")

    async def backlog(self, stream: str, group: str, cap: int = 100_000) -> int:
        """Entries not yet delivered to ``group`` (at most ``cap``), counted with XRANGE after the group's
        last-delivered id. XINFO's ``lag`` is never used: Redis documents it as approximate or missing after
        XDEL/XTRIM, ids set by hand and restarts, and a run resumed after an AOF rewrite was seen reporting a
        lag of 27,072 with nothing undelivered, which starved the prompt feeder."""
        for g in await self.group_info(stream):
            if g.get("name") == group:
                return await self.count_after(stream, str(g.get("last-delivered-id", "0-0")), cap)
        return min(cap, await self.length(stream))

    async def count_after(self, stream: str, last_id: str, cap: int = 100_000) -> int:
        """Entries with an id above ``last_id``, counted up to ``cap`` (pages of at most 1,000)."""

        async def go():
            n, start = 0, f"({last_id}"
            while n < cap:
                chunk = await self.redis.xrange(stream, min=start, max="+", count=min(1000, cap - n))
                if not chunk:
                    break
                n += len(chunk)
                start = f"({_sid(chunk[-1][0])}"
            return n

        return await self.call(go, f"XRANGE {stream}")

    async def trim_before(self, stream: str, min_id: str) -> int:
        """Drop entries older than ``min_id`` (only ids that are already acked are ever passed)."""
        return int(
            await self.call(
                lambda: self.redis.xtrim(stream, minid=min_id, approximate=False), f"XTRIM {stream}"
            )
        )

    async def latest_entries(self, stream: str, count: int = 1) -> list[Entry]:
        reply = await self.call(lambda: self.redis.xrevrange(stream, count=count), f"XREVRANGE {stream}")
        return [_entry(i, f) for i, f in reply]
