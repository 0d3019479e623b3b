"""Engine decode paths: tokens/s of the transformers engine's decode loop against ``model.generate``.

Same engine, same tiny model (CPU), same prompt batches (the reference task's prompts, G completions
each), one path right after the other in every round (the order alternates), so that drifting machine
load hits both alike. Tokens/s counts completion tokens (stop token included, padding not). Wall-clock
and process-CPU rates are both printed: on a shared machine the CPU rate is the steadier one, and one
torch thread (the default here) avoids OpenMP threads waiting on a busy core (two threads on a shared
2-core machine gave loop/generate ratios from 0.1 to 6.8 between rounds).
Run: ``python -m bench.engine_decode`` (about a minute; ``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.tasks import addition_rows
from modeling import build_tiny_model
from producer.engines.base import SamplingParams
from producer.engines.hf import HFEngine

PATHS = ("loop", "generate")


def timed(
    engine: HFEngine, path: str, batches: list[list[list[int]]], group: int, s: SamplingParams, seed: int
):
    """(wall seconds, CPU seconds, completion tokens) for ``batches`` on ``path``."""
    engine.decode = path
    torch.manual_seed(seed)
    t0, c0, tokens = time.perf_counter(), time.process_time(), 0
    for prompts in batches:
        tokens += sum(c.token_ids.size for g in engine.generate_sync(prompts, group, s) for c in g)
    return time.perf_counter() - t0, time.process_time() - c0, tokens


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


def bench(engine: HFEngine, prompts: list[list[int]], ppc: int, args: argparse.Namespace) -> dict[str, float]:
    s = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    batches = [prompts[i * ppc : (i + 1) * ppc] for i in range(args.calls)]
    for path in PATHS:  # warm-up: first shapes are slow in both
        timed(engine, path, batches[:1], args.group_size, s, 0)
    runs: dict[str, list[tuple[float, float, int]]] = {p: [] for p in PATHS}
    for rnd in range(args.rounds):
        for path in PATHS if rnd % 2 == 0 else PATHS[::-1]:
            runs[path].append(timed(engine, path, batches, args.group_size, s, 1000 + rnd))
    wall = {p: [tok / w for w, _, tok in runs[p]] for p in PATHS}
    cpu = {p: [tok / c for _, c, tok in runs[p]] for p in PATHS}
    ratio_wall = [a / b for a, b in zip(wall["loop"], wall["generate"], strict=True)]
    ratio_cpu = [a / b for a, b in zip(cpu["loop"], cpu["generate"], strict=True)]
    tokens = {
        p: statistics.mean(t for _, _, t in runs[p]) / (args.calls * ppc * args.group_size) for p in PATHS
    }
    print(
        f"{ppc:3d} prompts x G={args.group_size} per call ({tokens['loop']:.1f}/{tokens['generate']:.1f} tokens per "
        f"completion, loop/generate)"
    )
    for p in PATHS:
        print(f"    {p:8s} tokens/s wall {spread(wall[p])}   cpu {spread(cpu[p])}")
    print(f"    ratio loop/generate: wall {spread(ratio_wall, '{:.2f}')}   cpu {spread(ratio_cpu, '{:.2f}')}")
    return {"wall": statistics.median(ratio_wall), "cpu": statistics.median(ratio_cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--prompts-per-call", default="8,16,32", help="comma-separated batch sizes (prompts per call)"
    )
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--calls", type=int, default=4, help="engine calls per measurement")
    ap.add_argument("--rounds", type=int, default=7, help="measurements per path (median and range printed)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch default; 1 keeps the comparison steady on a shared machine)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(x) for x in args.prompts_per_call.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        engine = HFEngine(build_tiny_model(Path(tmp) / "model"), threads=args.threads, decode="loop")
        rows = [row for _, row in zip(range(max(sizes) * args.calls), addition_rows(seed=0), strict=False)]
        prompts = [engine.tokenizer.encode(r.prompt, add_special_tokens=False) for r in rows]
        print(
            f"tiny model, CPU, {torch.get_num_threads()} threads, max_new_tokens={args.max_new_tokens}, "
            f"T={args.temperature}; {args.calls} calls per measurement, {args.rounds} rounds: median [min..max]"
        )
        for ppc in sizes:
            bench(engine, prompts, ppc, args)
    print(
        "run: python -m bench.engine_decode [--max-new-tokens 64] [--prompts-per-call 8,16,32] [--threads 0]"
    )


if __name__ == "__main__":
    main()
