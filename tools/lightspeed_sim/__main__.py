"""CLI: `python -m tools.lightspeed_sim --port 0 --seed 42` serves a demo store until killed.

The first stdout line is `LIGHTSPEED_SIM_URL=http://127.0.0.1:<port>/api/2.0` (flushed), so a
parent process can start the simulator on a free port and read where it listens.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from datetime import UTC, datetime
from types import FrameType

from tools.lightspeed_sim.demo import generate_demo_store
from tools.lightspeed_sim.jsonutil import parse_ts
from tools.lightspeed_sim.server import SimServer
from tools.lightspeed_sim.store import SimStore


def build_parser() -> argparse.ArgumentParser:
    """Every option of the simulator CLI (documented in README.md)."""
    p = argparse.ArgumentParser(prog="python -m tools.lightspeed_sim", description=__doc__)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one (default 0)")
    p.add_argument("--seed", type=int, default=42, help="demo store seed (default 42)")
    p.add_argument("--customers", type=int, default=300, help="demo store size (default 300)")
    p.add_argument("--now", default=None, help="demo store 'now', ISO-8601 UTC (default: current time)")
    p.add_argument("--store", default=None, help="load the store from this JSON file instead of generating one")
    p.add_argument("--write-store", default=None, help="write the (generated or loaded) store to this file and exit")
    p.add_argument("--save-on-exit", default=None, help="dump the live store to this file when stopped")
    p.add_argument("--token", default="sim-token", help="the bearer token to accept (default sim-token)")
    p.add_argument("--registers", type=int, default=1, help="rate limit = 300 x registers + 50 (default 1)")
    p.add_argument("--rate-limit", type=int, default=None, help="override the rate limit per window")
    p.add_argument("--window-seconds", type=float, default=300.0, help="rate-limit window (default 300)")
    p.add_argument("--page-cap", type=int, default=200, help="largest page served, whatever page_size asks (200)")
    p.add_argument("--default-page-size", type=int, default=100, help="page size when none is asked (100)")
    p.add_argument("--empty-version", choices=("null", "missing"), default="null", help="empty page 'version'")
    p.add_argument("--retry-after", choices=("http-date", "seconds"), default="http-date", help="429 Retry-After form")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault-probability RNG")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def _load_store(args: argparse.Namespace) -> SimStore:
    if args.store:
        return SimStore.load(args.store)
    now = parse_ts(args.now) if args.now else datetime.now(UTC)
    return generate_demo_store(seed=args.seed, customers=args.customers, now=now)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGTERM/SIGINT."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    store = _load_store(args)
    if args.write_store:
        store.dump(args.write_store)
        print(f"wrote {args.write_store}", flush=True)
        return 0
    sim = SimServer(
        store,
        token=args.token,
        port=args.port,
        page_cap=args.page_cap,
        default_page_size=args.default_page_size,
        registers=args.registers,
        rate_limit=args.rate_limit,
        window_seconds=args.window_seconds,
        empty_version=args.empty_version,
        retry_after=args.retry_after,
        fault_seed=args.fault_seed,
        log_requests=args.verbose,
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"LIGHTSPEED_SIM_URL={sim.base_url}", flush=True)
    try:
        sim.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        if args.save_on_exit:
            store.dump(args.save_on_exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
