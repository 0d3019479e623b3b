"""Producer overhead: the whole producer loop (Redis read, admission, generation, scoring, XADD, XACK,
heartbeats, checkpoint polling) against the bare transformers engine generating the same prompts.

Both run in this process on the tiny model (CPU), with the same seed and the same prompt batches, so
they sample the very same tokens; the ratio of their groups/s is the loop's overhead (bar: >= 0.9).
Run: ``python -m bench.producer_overhead`` (about 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
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
) -> tuple[float, int]:
    """Seconds and completion tokens for the producer loop over freshly enqueued prompts (engine built beforehand)."""
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
        t0 = time.perf_counter()
        metrics = await producer.run()
        elapsed = time.perf_counter() - t0
        assert metrics.groups_total == args.prompts, metrics
        return elapsed, metrics.tokens_total
    finally:
        await client.aclose()


async def main_async(args: argparse.Namespace) -> float:
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


def report(args: argparse.Namespace, bare: list[tuple[float, int]], loop: list[tuple[float, int]]) -> float:
    def rates(runs):
        gps = statistics.median(args.prompts / s for s, _ in runs)
        tps = statistics.median(t / s for s, t in runs)
        return gps, tps

    (bg, bt), (lg, lt) = rates(bare), rates(loop)
    # per-round ratios (each round runs both back to back), so that drifting machine load cancels out
    per_round = [b_s / l_s for (b_s, _), (l_s, _) in zip(bare, loop, strict=True)]
    print(
        f"tiny model, CPU, {torch.get_num_threads()} threads; {args.prompts} prompts x G={args.group_size}, "
        f"max_new_tokens={args.max_new_tokens}, {args.prompts_per_call} prompts per call; median of {args.rounds} rounds after a warm-up round"
    )
    print(
        f"same tokens sampled in both: {[t for _, t in bare] == [t for _, t in loop]} ({bare[0][1]} tokens per round)"
    )
    times = ", ".join(f"{b_s:.2f}/{l_s:.2f}" for (b_s, _), (l_s, _) in zip(bare, loop, strict=True))
    print(f"seconds per round, bare/loop: {times}")
    print(f"bare HF engine : {bg:8.2f} groups/s {bt:10.0f} tokens/s")
    print(f"producer loop  : {lg:8.2f} groups/s {lt:10.0f} tokens/s")
    ratio = statistics.median(per_round)
    print(
        f"ratio loop/bare: {ratio:.3f} (median of rounds {', '.join(f'{r:.3f}' for r in per_round)}; bar >= 0.9)"
    )
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=160)
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
