"""Producer overhead: the whole producer loop (Redis read, admission, generation, scoring, XADD, XACK,
heartbeats, checkpoint polling) against the bare transformers engine generating the same prompts.

Both run in this process on the tiny model (CPU), with the same seed and the same prompt batches, so
they sample the very same tokens; the ratio of their groups/s is the loop's overhead (bar: >= 0.9).
Two ratios are reported:

- whole run: ``producer.run()`` from its call to its return, start-up (consumer group, first read, first
  admission) and shutdown included, against the bare engine's loop;
- steady state: the producer from the start of its first engine call to the end of its last append
  (``ProducerMetrics.first_generate_start`` / ``last_append_end``), against the same bare loop: what a
  long-running producer loses per engine call.

Run: ``python -m bench.producer_overhead`` (about a minute; 640 prompts per round, several seconds each).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import load_settings
from common.feeder import enqueue
from common.keys import RunKeys
from common.redis_conn import RedisServer, connect_async
from common.streams import StreamClient
from common.tasks import addition_rows
from modeling import build_tiny_model
from producer.assembly import build_producer
from producer.engines.hf import HFEngine
from producer.generate import sampling_from

SEED = 1234
BAR = 0.9


@dataclass(frozen=True)
class LoopRun:
    """One ``producer.run()``: its seconds from call to return, and the steady part of it."""

    whole_s: float
    tokens: int
    steady_s: float  # from the start of its first engine call to the end of its last append
    start_s: float  # from the call of run() to the start of its first engine call
    end_s: float  # from the end of its last append to the return of run()


def settings_for(redis_url: str, run: str, run_dir: Path, model: Path, args: argparse.Namespace):
    return load_settings(
        None,
        {
            "redis.url": redis_url,
            "run": run,
            "run_dir": str(run_dir),
            "producer.model": str(model),
            "producer.producer_id": "bench",
            "producer.max_groups": args.prompts,
            "pipeline.group_size": args.group_size,
            "producer.prompts_per_call": args.prompts_per_call,
            "producer.sampling.max_new_tokens": args.max_new_tokens,
            "pipeline.batch_groups": 10_000,
            "pipeline.rollouts_maxlen": 200_000,
            "producer.threads": args.threads,
        },
        env={},
    )


def bare_run(
    engine: HFEngine, prompts: list[list[int]], args: argparse.Namespace, sampling
) -> tuple[float, int]:
    """Seconds and completion tokens for the engine alone, in the producer's batches."""
    torch.manual_seed(SEED)
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), args.prompts_per_call):
        groups = engine.generate_sync(prompts[i : i + args.prompts_per_call], args.group_size, sampling)
        tokens += sum(c.token_ids.size for g in groups for c in g)
    return time.perf_counter() - t0, tokens


async def service_run(
    redis_url: str, run_dir: Path, model: Path, args: argparse.Namespace, rnd: int
) -> LoopRun:
    """The producer loop over freshly enqueued prompts (engine built beforehand)."""
    run = f"bench-{rnd}"
    settings = settings_for(redis_url, run, run_dir, model, args)
    client = connect_async(settings.redis)
    streams = StreamClient(client)
    try:
        rows = [(f"t{i}", row) for i, row in zip(range(args.prompts), addition_rows(seed=0), strict=False)]
        await enqueue(streams, RunKeys(run), rows, maxlen=100_000)
        producer = await build_producer(settings, streams)
        # warm-up, like the bare engine's
        producer.engine.generate_sync([[5, 6, 15]], 2, sampling_from(settings))
        torch.manual_seed(SEED)
        t0 = time.monotonic()  # the clock of the metrics' timestamps
        metrics = await producer.run()
        t1 = time.monotonic()
        assert metrics.groups_total == args.prompts, metrics
        first, last = metrics.first_generate_start, metrics.last_append_end
        return LoopRun(t1 - t0, metrics.tokens_total, last - first, first - t0, t1 - last)
    finally:
        await client.aclose()


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        redis = RedisServer(root / "redis").start()
        try:
            settings = settings_for(redis.url, "bench-0", root, model, args)
            sampling = sampling_from(settings)
            engine = HFEngine(model, threads=args.threads)
            rows = [row for _, row in zip(range(args.prompts), addition_rows(seed=0), strict=False)]
            prompts = [engine.tokenizer.encode(r.prompt, add_special_tokens=False) for r in rows]
            engine.generate_sync([[5, 6, 15]], 2, sampling)  # warm-up
            bare, loop = [], []
            for rnd in range(args.rounds + 1):  # round 0 warms up (first batch-size shapes are slow in both)
                b_run = bare_run(engine, prompts, args, sampling)
                l_run = await service_run(redis.url, root, model, args, rnd)
                if rnd > 0:
                    bare.append(b_run)
                    loop.append(l_run)
        finally:
            redis.stop()
    return report(args, bare, loop)


def report(args: argparse.Namespace, bare: list[tuple[float, int]], loop: list[LoopRun]) -> dict[str, float]:
    """Print both ratios against the bar, whatever they are; return them."""
    n = args.prompts
    bare_s = [s for s, _ in bare]
    print(
        f"tiny model, CPU, {torch.get_num_threads()} threads; {n} prompts x G={args.group_size}, "
        f"max_new_tokens={args.max_new_tokens}, {args.prompts_per_call} prompts per call; "
        f"median of {args.rounds} rounds after a warm-up round"
    )
    print(
        f"same tokens sampled in both: {[t for _, t in bare] == [r.tokens for r in loop]} "
        f"({bare[0][1]} tokens per round)"
    )
    rounds = ", ".join(f"{b:.2f}/{r.whole_s:.2f}/{r.steady_s:.2f}" for b, r in zip(bare_s, loop, strict=True))
    print(f"seconds per round, bare / loop whole run / loop steady state: {rounds}")
    start_ms = statistics.median(r.start_s for r in loop) * 1e3
    end_ms = statistics.median(r.end_s for r in loop) * 1e3
    print(
        f"producer start-up (run() to its first engine call): {start_ms:.0f} ms; "
        f"shutdown (its last append to run()'s return): {end_ms:.0f} ms (medians)"
    )
    series = {"whole run": [r.whole_s for r in loop], "steady state": [r.steady_s for r in loop]}
    bare_gps, bare_tps = statistics.median(n / s for s in bare_s), statistics.median(t / s for s, t in bare)
    print(f"bare HF engine             : {bare_gps:8.2f} groups/s {bare_tps:10.0f} tokens/s")
    for label, secs in series.items():
        gps = statistics.median(n / s for s in secs)
        tps = statistics.median(r.tokens / s for r, s in zip(loop, secs, strict=True))
        print(f"producer loop, {label:<12}: {gps:8.2f} groups/s {tps:10.0f} tokens/s")
    # per-round ratios (each round runs both back to back), so that drifting machine load cancels out
    ratios = {}
    for label, secs in series.items():
        per_round = [b / s for b, s in zip(bare_s, secs, strict=True)]
        ratios[label] = ratio = statistics.median(per_round)
        print(
            f"ratio loop/bare, {label:<12}: {ratio:.3f} (median of rounds "
            f"{', '.join(f'{r:.3f}' for r in per_round)}); bar >= {BAR}: {'met' if ratio >= BAR else 'NOT met'}"
        )
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=640, help="prompts per round (640: several seconds)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--prompts-per-call", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
