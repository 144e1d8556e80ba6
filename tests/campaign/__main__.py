"""``python -m tests.campaign --seed N --steps K --duration S [--rate R] [--kinds a,b]``:
one fault campaign; exit status 1 when a store is not exact (beyond the expected,
attributed losses), 0 when every store is."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

from . import run_campaign
from .faults import KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.campaign", description=__doc__)
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--steps", type=int, default=20, help="faults, one at a time")
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of faults at most")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"faults to draw from (default: {','.join(KINDS)})"
    )
    parser.add_argument(
        "--no-spool", action="store_true", help="run the service without its crash spool"
    )
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    result = asyncio.run(
        run_campaign(
            seed, args.steps, args.duration, rate=args.rate, kinds=kinds, spool=not args.no_spool,
            out=lambda text: print(text, flush=True),
        )
    )  # fmt: skip
    return 0 if result.exact else 1


if __name__ == "__main__":
    sys.exit(main())
