"""Erase one customer from the tier-sync data dir (README: Privacy, "Erasing one customer").

    python -m tools.erase_customer [--data-dir DIR] [--dry-run] [--json] CUSTOMER_ID

`--data-dir` defaults to the `tier_sync_data_dir` Variable (environment `AIRFLOW_VAR_...` or the
Airflow metadata DB), validated like the tasks do. Prints every file touched with the rows removed,
the order store's rows, and what must be done by hand (git history, Data Docs). Exit status 0 when
done (or, with --dry-run, when there is something to do), 2 for a bad id or data dir, 3 when the
customer is not found, 4 when the store or a file could not be rewritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from include.tier_sync import settings
from include.tier_sync.erasure import CustomerNotFound, erase_customer


def _print_report(report: dict[str, Any]) -> None:
    verb = "would remove" if report["dry_run"] else "removed"
    print(f"customer {report['customer_id']} in {report['data_dir']}{' (dry run: nothing written)' if report['dry_run'] else ''}:")
    for item in report["files"]:
        print(f"  {verb} {item['removed']:>5} row(s)/item(s) from {item['path']}")
    store = report["store"]
    print(
        f"  order store: {verb} {store['customers']} customer version(s) and {store['sales']} sale version(s) "
        f"({store['segments_rewritten']} segment(s) rewritten)"
    )
    print("  kept (aggregates, no customer named): " + ", ".join(report["kept_aggregates"]))
    for note in report["needs_attention"]:
        print(f"  TO DO BY HAND: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.erase_customer", description=__doc__.split("\n\n")[0])
    parser.add_argument("customer_id", help="the Lightspeed customer id (the master's 'Customer ID')")
    parser.add_argument("--data-dir", help="the data dir (default: the tier_sync_data_dir Variable)")
    parser.add_argument("--dry-run", action="store_true", help="report what would be removed; write nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        data_dir = settings.check_data_dir(args.data_dir) if args.data_dir else settings.data_dir()
        report = erase_customer(data_dir, args.customer_id, dry_run=args.dry_run)
    except CustomerNotFound as exc:
        print(f"erase_customer: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"erase_customer: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # StoreError (e.g. a concurrent extraction), I/O
        print(f"erase_customer: {type(exc).__name__}: {exc}; run it again once the cause is fixed", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
