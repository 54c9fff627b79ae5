"""`make test` from a fresh clone, as CI runs it: install time, pytest's time, test count.

Clones the committed HEAD into a temporary folder and runs `make test` there (it creates its
own `.venv` and installs, as on a fresh machine), timing the whole and reading pytest's
summary line for the test count and pytest's own seconds, and its 25 slowest steps
(`--durations=25`, passed through PYTEST_ADDOPTS; the steps run on two workers). Results:
benchmarks/results/make_test_time.{json,md}, quoted in docs/tests.md.

    python benchmarks/make_test_time.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_results import machine_summary, write_results  # noqa: E402

SUMMARY = re.compile(r"^=* ?(?P<passed>\d+) passed.* in (?P<seconds>[\d.]+)s", re.MULTILINE)
DURATION = re.compile(r"^(?P<seconds>[\d.]+)s (?P<when>setup|call|teardown) +(?P<test>\S+)$", re.MULTILINE)


def run() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="make-test-") as tmp:
        clone = Path(tmp) / "fresh"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTEST_ADDOPTS": "--durations=25"}
        done = subprocess.run(["make", "test"], cwd=clone, capture_output=True, text=True, env=env)
        total = time.perf_counter() - start
    found = SUMMARY.search(done.stdout)
    if done.returncode or found is None:
        raise SystemExit(f"make test failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return {"machine": machine_summary(), "commit": commit, "passed": int(found["passed"]),
            "pytest_seconds": float(found["seconds"]), "total_seconds": round(total, 1),
            "slowest": [{"seconds": float(m["seconds"]), "when": m["when"], "test": m["test"]}
                        for m in DURATION.finditer(done.stdout)]}


def markdown(r: dict) -> str:
    mc = r["machine"]
    return (f"Machine: {mc['cpu']}, {mc['cores']} cores, vector ISA {mc['vector_isa']}. "
            f"`make test` in a fresh clone of {r['commit']}.\n\n"
            "| tests passed | pytest's seconds | seconds with the install |\n|---:|---:|---:|\n"
            f"| {r['passed']} | {r['pytest_seconds']:.0f} | {r['total_seconds']:.0f} |\n\n"
            "| seconds | step | test |\n|---:|---|---|\n"
            + "".join(f"| {d['seconds']:.1f} | {d['when']} | `{d['test']}` |\n" for d in r["slowest"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "make_test_time"))
    write_results(parser.parse_args().out, run(), markdown)


if __name__ == "__main__":
    main()
