"""A bounded fuzz run of the entry points in ``tests/support/fuzz_targets.py``.

    python -m tests.fuzz SECONDS [--seed N] [--target NAME]

Each target gets an equal share of the time budget and runs batches of generated inputs
(hypothesis, no example database) until its share is spent. It prints the seed, then
the executions of each target; on the first input that breaks a property (an exception
a target does not document, a header with CR, LF or NUL, an allow it must not give) it
prints the smallest such input hypothesis finds and exits 1. The same seed gives the
same inputs: a failure is reproduced with the ``--seed`` and ``--target`` it prints.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.support.fuzz_targets import TARGETS, Target

BATCH = 100


class Failed(Exception):
    """A property broke in the batch run with ``batch_seed``."""

    def __init__(self, batch_seed: int) -> None:
        super().__init__(batch_seed)
        self.batch_seed = batch_seed


def fuzz(target: Target, budget_s: float, base_seed: int) -> int:
    """Run ``target`` for about ``budget_s`` seconds (at least one batch); the number of
    executions. ``Failed`` from what the check raised, for the smallest input found."""
    executions = 0
    deadline = time.monotonic() + budget_s

    def counted(value: Any) -> None:
        nonlocal executions
        executions += 1
        target.check(value)

    batch = 0
    while batch == 0 or time.monotonic() < deadline:
        run = given(target.strategy())(counted)
        run = settings(
            max_examples=BATCH,
            deadline=None,
            database=None,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
        )(run)
        try:
            seed(base_seed + batch)(run)()
        except Exception as error:  # anything the check raised is a failure of the run
            raise Failed(base_seed + batch) from error
        batch += 1
    return executions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seconds", type=float, help="the time budget for all targets")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--target", choices=[t.name for t in TARGETS], help="default: all")
    args = parser.parse_args(argv)
    targets = [t for t in TARGETS if args.target in (None, t.name)]
    # The bridge logs what it refuses (an unusable Kratos answer, say): expected here.
    logging.disable(logging.WARNING)
    base_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"fuzz: seed {base_seed}, {args.seconds:g} s over {len(targets)} targets", flush=True)
    share = args.seconds / len(targets)
    total = 0
    for target in targets:
        try:
            executions = fuzz(target, share, base_seed)
        except Failed as failed:
            error = failed.__cause__
            print(f"fuzz: {target.name}: FAILED: {type(error).__name__}: {error}")
            for note in getattr(error, "__notes__", ()):  # hypothesis's smallest input
                print(f"fuzz:   {note}")
            again = f"--seed {failed.batch_seed} --target {target.name}"
            print(f"fuzz: reproduce with: python -m tests.fuzz 1 {again}")
            return 1
        total += executions
        print(f"fuzz: {target.name}: {executions} executions", flush=True)
    print(f"fuzz: {total} executions, no failure (seed {base_seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
