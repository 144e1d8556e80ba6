"""`make mutate`'s report: mutmut's verdicts per module, the score, and every mutant not killed.

Run in the mutmut work directory (``.mutmut/``) after ``mutmut run``, with the modules as
arguments (``lunamon/flusher.py`` ...). Reads mutmut's ``mutants/<module>.meta`` files.
Score: killed (a test failed, or the mutant timed out) over all mutants; a mutant no
test reaches counts as not killed. Exit status 0 (the verdicts are for docs/mutation.md).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# mutmut's exit codes (mutmut.stats.status_by_exit_code), folded into four verdicts.
KILLED = {1, 3, 24, -24, 36, 152, 255, 37}
SURVIVED = {0}
NO_TESTS = {5, 33}


def verdict(exit_code: int | None) -> str:
    if exit_code in KILLED:
        return "killed"
    if exit_code in SURVIVED:
        return "survived"
    if exit_code in NO_TESTS:
        return "no tests"
    if exit_code is None:
        return "not checked"
    return "suspicious"


def main(modules: list[str]) -> int:
    totals: Counter[str] = Counter()
    not_killed: list[tuple[str, str]] = []
    print(
        f"{'module':<28} {'mutants':>7} {'killed':>7} {'survived':>8} {'no tests':>8} {'score':>7}"
    )
    for module in modules:
        meta = Path("mutants") / f"{module}.meta"
        if not meta.exists():
            print(f"{module:<28} (no results: run mutmut first)")
            continue
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(verdict(code) for code in codes.values())
        totals.update(counts)
        total = len(codes)
        score = counts["killed"] / total if total else 1.0
        print(
            f"{module:<28} {total:>7} {counts['killed']:>7} {counts['survived']:>8}"
            f" {counts['no tests']:>8} {score:>7.1%}"
        )
        not_killed += [(name, verdict(code)) for name, code in codes.items()]
    total = sum(totals.values())
    score = totals["killed"] / total if total else 1.0
    print(
        f"{'overall':<28} {total:>7} {totals['killed']:>7} {totals['survived']:>8}"
        f" {totals['no tests']:>8} {score:>7.1%}"
    )
    left = sorted((name, v) for name, v in not_killed if v != "killed")
    if left:
        print(f"\nnot killed ({len(left)}; `mutmut show <name>` in .mutmut/ shows one):")
        for name, v in left:
            print(f"  {v:<12} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
