"""DAG parse time: a DagBag load of dags/ next to an empty DAG's, each in a fresh interpreter.

Target (issue 2): within 0.5 s of the empty DAG, and no pandas, GX, git or pyarrow import at parse
time. Prints the median of several runs and the heavy modules the parse imported.

    .venv/bin/python bench/parse_time.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["pandas", "great_expectations", "git", "pyarrow", "numpy"]

EMPTY_DAG = '''
from __future__ import annotations
from datetime import datetime, UTC
from airflow.sdk import dag

@dag(dag_id="empty", schedule=None, start_date=datetime(2026, 1, 1, tzinfo=UTC))
def empty() -> None:
    pass

empty()
'''

PROBE = (
    """
import json, sys, time
from airflow.models import DagBag
import airflow.sdk  # warm: the SDK itself is paid by every DAG, ours or empty
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "dags": sorted(bag.dags), "errors": list(bag.import_errors),
                  "heavy": [m for m in HEAVY if m in sys.modules]}))
"""
).replace("HEAVY", repr(HEAVY), 1)


def parse_once(folder: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True,
                         env=env, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty_dir = Path(tmp) / "empty_dags"
        empty_dir.mkdir()
        (empty_dir / "empty.py").write_text(EMPTY_DAG)
        env = dict(os.environ, AIRFLOW_HOME=str(Path(tmp) / "home"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
                   AIRFLOW__LOGGING__LOGGING_LEVEL="ERROR")
        results = {}
        for label, folder in (("empty DAG", empty_dir), ("dags/", REPO / "dags")):
            runs = [parse_once(folder, env) for _ in range(args.runs)]
            errors = [e for r in runs for e in r["errors"]]
            if errors:
                print(f"{label}: import errors in {errors}")
                return 1
            results[label] = (statistics.median(r["seconds"] for r in runs), runs[-1])
    empty_s = results["empty DAG"][0]
    ours_s, ours = results["dags/"]
    print(f"DagBag parse, median of {args.runs} fresh interpreters (airflow.sdk pre-imported in both):")
    print(f"  empty DAG          {empty_s:6.3f} s")
    print(f"  dags/ ({', '.join(ours['dags'])})  {ours_s:6.3f} s")
    print(f"  difference         {ours_s - empty_s:+6.3f} s   (target: <= +0.500 s)")
    print(f"  heavy modules imported while parsing dags/: {ours['heavy'] or 'none'}")
    return 0 if ours_s - empty_s <= 0.5 and not ours["heavy"] else 2


if __name__ == "__main__":
    raise SystemExit(main())
