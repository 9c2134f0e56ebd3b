"""Lightspeed Retail X-Series API 2.0 simulator (stdlib only; never imported by `include/`).

See README.md in this folder for the CLI, every option and the variant chosen for each
UNCONFIRMED point of the API reference.
"""

from __future__ import annotations

from tools.lightspeed_sim.demo import generate_demo_store
from tools.lightspeed_sim.faults import Fault, FaultRegistry, RateLimiter
from tools.lightspeed_sim.server import RequestRecord, SimServer
from tools.lightspeed_sim.store import SimStore, StoreError

__all__ = [
    "Fault",
    "FaultRegistry",
    "RateLimiter",
    "RequestRecord",
    "SimServer",
    "SimStore",
    "StoreError",
    "generate_demo_store",
]
