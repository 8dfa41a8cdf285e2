#!/usr/bin/env bash
# Runs the suite N times, each time on a clean clone of the current commit (as CI would), and
# prints which tests failed in how many of the N runs, with each run's totals and wall time.
#   bash tests/flaky.sh N [pytest args...]     e.g. bash tests/flaky.sh 3
#                                                   bash tests/flaky.sh 2 -k whoami
# Each run is `bash tests/run.sh -p no:cacheprovider --junitxml=... [pytest args]` in its own
# temporary clone, deleted afterwards; the Go binaries are cached in ~/.cache, so only the
# first run on a machine builds them. Each run's log and JUnit XML stay in the results
# directory named at the end. Only committed work is tested: uncommitted changes are not in
# the clone. Exit 0 when no test failed in any run, 1 when one did, 2 on a usage error.
set -euo pipefail

usage() { echo "usage: bash tests/flaky.sh N [pytest args...]  (N: runs, 1 or more)" >&2; }
if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  usage
  exit 2
fi
runs=$1
shift

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse HEAD)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  echo "flaky.sh: uncommitted changes are not tested: each run clones $commit" >&2
fi
results=$(mktemp -d "${TMPDIR:-/tmp}/flaky.XXXXXX")
clone=""
cleanup() { [ -z "$clone" ] || rm -rf "$clone"; }
trap cleanup EXIT

for ((run = 1; run <= runs; run++)); do
  clone=$(mktemp -d "${TMPDIR:-/tmp}/flaky-clone.XXXXXX")
  git clone -q --no-checkout "$repo" "$clone/repo"
  git -C "$clone/repo" checkout -q --detach "$commit"
  echo "run $run of $runs: $clone/repo (log: $results/run-$run.log)"
  started=$(date +%s)
  status=0
  (cd "$clone/repo" &&
    bash tests/run.sh -p no:cacheprovider --junitxml="$results/run-$run.xml" "$@") \
    >"$results/run-$run.log" 2>&1 || status=$?
  echo "$run $status $(($(date +%s) - started))" >>"$results/runs"
  rm -rf "$clone"
  clone=""
done

python3 - "$results" "$runs" "$commit" "$repo" <<'PYTHON'
"""The table: per test that failed at least once, in how many runs; then each run's totals."""

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

results, runs, commit, repo = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])


def node_id(case: ET.Element) -> str:
    """pytest's node id (tests/test_x.py::test_y[param]) from JUnit's dotted classname."""
    parts = case.get("classname", "").split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (repo / path).is_file():
            return "::".join([path, *parts[cut:], case.get("name", "")])
    return "::".join([*parts, case.get("name", "")])


failed_in: Counter[str] = Counter()
rows = []
for line in (results / "runs").read_text().splitlines():
    run, status, seconds = (int(word) for word in line.split())
    xml = results / f"run-{run}.xml"
    if not xml.is_file():  # run.sh stopped before pytest wrote its report
        rows.append((run, status, seconds, None))
        continue
    counts = Counter()
    for case in ET.parse(xml).getroot().iter("testcase"):
        counts["tests"] += 1
        outcome = {child.tag for child in case} & {"failure", "error", "skipped"}
        if outcome & {"failure", "error"}:
            failed_in[node_id(case)] += 1
            counts["failed"] += 1
        elif outcome:
            counts["skipped"] += 1
    rows.append((run, status, seconds, counts))

print(f"\n{runs} run(s) of {commit[:12]}; logs and JUnit XML in {results}")
print(f"{'run':>4}  {'exit':>4}  {'wall':>8}  {'tests':>6}  {'failed':>6}  {'skipped':>7}")
for run, status, seconds, counts in rows:
    wall = f"{seconds // 60}m{seconds % 60:02d}s"
    if counts is None:
        print(f"{run:>4}  {status:>4}  {wall:>8}  no report: see run-{run}.log")
    else:
        print(
            f"{run:>4}  {status:>4}  {wall:>8}  {counts['tests']:>6}  "
            f"{counts['failed']:>6}  {counts['skipped']:>7}"
        )
if failed_in:
    print(f"\n{'failed':>8}  test")
    for test, times in sorted(failed_in.items(), key=lambda item: (-item[1], item[0])):
        print(f"{f'{times} of {runs}':>8}  {test}")
total = sum(failed_in.values())
broken = sum(1 for *_, counts in rows if counts is None)
print(
    f"\ntotal: {len(failed_in)} test(s) failed at least once, {total} failure(s) in {runs} run(s)"
    + (f"; {broken} run(s) without a report" if broken else "")
)
sys.exit(1 if failed_in or broken else 0)
PYTHON
