"""What handing a request to a worker thread costs the bridge: ``bridge.web.asgi.off_loop``
as the server uses it, many requests at once on one event loop and a pool of threads.

Not a test: it prints figures. The work handed off only sleeps 0.2 ms (the thread waits,
as on a round trip to Redis or Kratos, without the GIL), so the CPU counted is the
hand-off's: the loop's future and timer, the pool's queue, the thread's wake-up and the
answer's way back to the loop.

    python bench/handoff.py [--requests 30000] [--concurrency 64] [--threads 16]
        [--checkout DIR]

Run it pinned (``taskset -c 1``); ``--checkout`` measures the ``bridge`` package of another
checkout (a ``git worktree`` of the commit before a change, say), so that two can be run in
turn from one copy of this script.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def waits() -> None:
    time.sleep(0.0002)


async def hand_off(off_loop, pool: ThreadPoolExecutor, requests: int, concurrency: int) -> None:
    left = iter(range(requests))

    async def client() -> None:
        for _ in left:
            await off_loop(pool, 5.0, waits)

    await asyncio.gather(*(client() for _ in range(concurrency)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--checkout", type=Path, default=ROOT)
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    from bridge.web.asgi import off_loop
    from bridge.web.server import GIL_SWITCH_INTERVAL

    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # as the server runs
    with ThreadPoolExecutor(args.threads) as pool:
        asyncio.run(hand_off(off_loop, pool, 1000, args.concurrency))  # threads started
        cpu, wall = time.process_time(), time.monotonic()
        asyncio.run(hand_off(off_loop, pool, args.requests, args.concurrency))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    print(
        f"{cpu / args.requests * 1e6:.1f} us CPU per hand-off, {args.requests / wall:,.0f}/s "
        f"({args.concurrency} at once, {args.threads} threads; {off_loop.__module__} from "
        f"{Path(sys.modules[off_loop.__module__].__file__ or '').parents[2]})"
    )


if __name__ == "__main__":
    main()
