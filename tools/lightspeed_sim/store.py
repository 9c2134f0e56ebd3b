"""The simulator's data: customers, customer groups and sales, plus the global version counter.

Only the latest state of each record exists (as in the real API): an edit re-stamps `version`
and `updated_at`, so the record moves to the end of the version feed.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tools.lightspeed_sim.jsonutil import dumps, fmt_ts, loads, parse_ts

FORMAT = "lightspeed-sim-store/1"
DEFAULT_GROUP_NAME = "All Customers"
DEFAULT_GROUP_CODE = "1111111111"
VERSION_START = 30_000_000_000

# Fields a PUT /customers/{id} may not change (the server computes or owns them).
CUSTOM_FIELDS = ("custom_field_1", "custom_field_2", "custom_field_3", "custom_field_4")
CUSTOMER_READ_ONLY = frozenset(
    {
        "id",
        "name",
        "version",
        "created_at",
        "updated_at",
        "deleted_at",
        "year_to_date",
        "balance",
        "loyalty_balance",
    }
)


class StoreError(ValueError):
    """A write the store refuses (unknown id, deleted record, bad group); the server maps it to 4xx."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class SimStore:
    """Customers, groups and sales keyed by id, a global version counter and a clock.

    Every mutation goes through a method here (or holds `lock`), so versions stay unique and
    ascending across resources, with gaps like the real counter.
    """

    def __init__(
        self,
        *,
        customers: dict[str, dict[str, Any]] | None = None,
        groups: dict[str, dict[str, Any]] | None = None,
        sales: dict[str, dict[str, Any]] | None = None,
        next_version: int = VERSION_START,
        time_floor: datetime | None = None,
        seed: int = 0,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.customers: dict[str, dict[str, Any]] = customers if customers is not None else {}
        self.groups: dict[str, dict[str, Any]] = groups if groups is not None else {}
        self.sales: dict[str, dict[str, Any]] = sales if sales is not None else {}
        self.next_version = next_version
        # Writes are stamped no earlier than this (a demo store generated for a future `now`
        # must not get `updated_at` values older than its own records).
        self.time_floor = time_floor
        # Scenario label -> record id (demo stores), so tests can find "the 1499.99 customer".
        self.labels: dict[str, str] = labels if labels is not None else {}
        self.clock: Callable[[], datetime] | None = None
        self.lock = threading.RLock()
        self._rng = random.Random(seed)

    # -- counters and time -------------------------------------------------------------------

    def new_version(self) -> int:
        """Take the next global version; the counter then jumps by a small random gap."""
        with self.lock:
            version = self.next_version
            self.next_version += self._rng.randint(1, 97)
            return version

    def now(self) -> datetime:
        """Current instant for stamping writes (never before `time_floor`)."""
        current = self.clock() if self.clock is not None else datetime.now(UTC)
        current = current.astimezone(UTC).replace(microsecond=0)
        if self.time_floor is not None and current <= self.time_floor:
            current = self.time_floor + timedelta(seconds=1)
        return current

    def stamp(self, record: dict[str, Any]) -> None:
        """Mark a record as changed now: new version, new updated_at."""
        with self.lock:
            record["version"] = self.new_version()
            record["updated_at"] = fmt_ts(self.now())

    # -- groups ------------------------------------------------------------------------------

    def live_group(self, group_id: str) -> dict[str, Any] | None:
        """The group with this id unless it is unknown or deleted."""
        group = self.groups.get(group_id)
        if group is None or group.get("deleted_at") is not None:
            return None
        return group

    def default_group_id(self) -> str | None:
        """The store's default group: named "All Customers", else group_id "1111111111"."""
        live = [g for g in self.groups.values() if g.get("deleted_at") is None]
        for group in live:
            if group.get("name") == DEFAULT_GROUP_NAME:
                return str(group["id"])
        for group in live:
            if group.get("group_id") == DEFAULT_GROUP_CODE:
                return str(group["id"])
        return None

    def create_group(self, name: str, group_id: str | None = None, *, record_id: str | None = None) -> dict[str, Any]:
        """Create a customer group (POST /customer_groups); `group_id` gets a generated code if absent."""
        with self.lock:
            now = fmt_ts(self.now())
            if group_id is None:
                stem = "".join(ch for ch in name if ch.isalnum())[:12] or "Group"
                group_id = f"{stem}-{self._code(4)}"
            gid = record_id or self.new_id()
            group: dict[str, Any] = {
                "id": gid,
                "name": name,
                "group_id": group_id,
                "created_at": now,
                "updated_at": now,
                "deleted_at": None,
                "version": self.new_version(),
            }
            self.groups[gid] = group
            return group

    def delete_group(self, group_id: str) -> dict[str, Any]:
        """A person deletes a group in the POS: soft-deleted, its live members moved to the default group.

        That is what the UI does (API reference §5.3). The default group itself cannot be deleted.
        """
        with self.lock:
            group = self.live_group(group_id)
            if group is None:
                raise StoreError(f"unknown or deleted customer group {group_id}", 404)
            default = self.default_group_id()
            if default is None or default == group_id:
                raise StoreError("the default customer group cannot be deleted (nor a group without one)")
            for customer in self.customers.values():
                if customer.get("customer_group_id") == group_id and customer.get("deleted_at") is None:
                    self.set_customer_group(customer, default)
            group["deleted_at"] = fmt_ts(self.now())
            self.stamp(group)
            return group

    # -- customers ---------------------------------------------------------------------------

    def live_customer(self, customer_id: str) -> dict[str, Any] | None:
        """The customer with this id unless it is unknown or deleted."""
        customer = self.customers.get(customer_id)
        if customer is None or customer.get("deleted_at") is not None:
            return None
        return customer

    def set_customer_group(self, customer: dict[str, Any], group_id: str) -> bool:
        """Put a customer in a group (one group per customer); stamp only when it changed."""
        with self.lock:
            if customer.get("customer_group_id") == group_id:
                return False
            customer["customer_group_id"] = group_id
            self.stamp(customer)
            return True

    def move_customer_to_group(self, customer_id: str, group_id: str) -> dict[str, Any]:
        """A person in the POS moves a customer: always re-stamps version and updated_at."""
        with self.lock:
            customer = self.live_customer(customer_id)
            if customer is None:
                raise StoreError(f"unknown or deleted customer {customer_id}", 404)
            if self.live_group(group_id) is None:
                raise StoreError(f"unknown or deleted customer group {group_id}")
            customer["customer_group_id"] = group_id
            self.stamp(customer)
            return customer

    def update_customer(self, customer_id: str, body: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
        """PUT semantics chosen for the simulator: merge the fields present, ignore read-only ones.

        ``replace=True`` serves the other reading of the API (§4.1): a writable field absent from
        the body is cleared (the group falls back to the default group), so a partial PUT loses data.
        """
        with self.lock:
            customer = self.live_customer(customer_id)
            if customer is None:
                raise StoreError(f"unknown or deleted customer {customer_id}", 404)
            known = set(customer) | set(CUSTOM_FIELDS)
            changes = {k: v for k, v in body.items() if k not in CUSTOMER_READ_ONLY and k in known}
            if replace:
                cleared = {k: None for k in customer if k not in CUSTOMER_READ_ONLY and k not in changes}
                cleared.pop("customer_group_id", None)
                changes = {**cleared, "enable_loyalty": False, **changes}
                changes.setdefault("customer_group_id", self.default_group_id())
            for key in CUSTOM_FIELDS:
                if key in changes and changes[key] is not None and not isinstance(changes[key], str):
                    raise StoreError(f"{key} must be a string or null")
            if "customer_group_id" in changes:
                group_id = changes["customer_group_id"]
                if not isinstance(group_id, str) or self.live_group(group_id) is None:
                    raise StoreError(f"customer_group_id {group_id!r} is not a live customer group")
            for key in ("first_name", "last_name"):
                if key in changes and changes[key] is not None and not isinstance(changes[key], str):
                    raise StoreError(f"{key} must be a string or null")
            if "enable_loyalty" in changes and not isinstance(changes["enable_loyalty"], bool):
                raise StoreError("enable_loyalty must be a boolean")
            customer.update(changes)
            customer["name"] = customer_name(customer.get("first_name"), customer.get("last_name"))
            self.stamp(customer)
            return customer

    def delete_customer(self, customer_id: str) -> dict[str, Any]:
        """Soft-delete a customer (deleted_at set, version re-stamped)."""
        with self.lock:
            customer = self.customers.get(customer_id)
            if customer is None:
                raise StoreError(f"unknown customer {customer_id}", 404)
            customer["deleted_at"] = fmt_ts(self.now())
            self.stamp(customer)
            return customer

    # -- ids ---------------------------------------------------------------------------------

    def new_id(self) -> str:
        """A UUID-shaped id from the store's seeded RNG (reproducible runs)."""
        return new_uuid(self._rng)

    def _code(self, n: int) -> str:
        return "".join(self._rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(n))

    # -- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The whole store as a JSON-ready dict (records keep their Decimal amounts)."""
        with self.lock:
            return {
                "format": FORMAT,
                "next_version": self.next_version,
                "time_floor": fmt_ts(self.time_floor) if self.time_floor is not None else None,
                "labels": dict(self.labels),
                "customer_groups": list(self.groups.values()),
                "customers": list(self.customers.values()),
                "sales": list(self.sales.values()),
            }

    def dumps(self) -> str:
        """The store as exact JSON text (what `--store FILE` reads)."""
        with self.lock:
            return dumps(self.to_dict())

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the store to a file atomically (temp file + rename)."""
        target = Path(path)
        text = self.dumps()
        fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimStore:
        """Rebuild a store from `to_dict` output (amounts must already be Decimal)."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a simulator store (format {data.get('format')!r}, expected {FORMAT!r})")
        records: dict[str, dict[str, dict[str, Any]]] = {}
        for key in ("customer_groups", "customers", "sales"):
            records[key] = {str(r["id"]): r for r in data.get(key, [])}
        versions = [
            int(r["version"]) for rs in records.values() for r in rs.values() if r.get("version") is not None
        ]
        next_version = max([int(data.get("next_version") or VERSION_START), *(v + 1 for v in versions)])
        floor = data.get("time_floor")
        return cls(
            customers=records["customers"],
            groups=records["customer_groups"],
            sales=records["sales"],
            next_version=next_version,
            time_floor=parse_ts(floor) if floor else None,
            labels=dict(data.get("labels") or {}),
            seed=next_version,
        )

    @classmethod
    def loads(cls, text: str | bytes) -> SimStore:
        """Parse exact JSON text written by `dumps`."""
        return cls.from_dict(loads(text))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SimStore:
        """Read a store file written by `dump` (decimals parsed exactly)."""
        return cls.loads(Path(path).read_bytes())


def customer_name(first: Any, last: Any) -> str | None:
    """The derived `name`: "first last", trimmed; None when both are empty."""
    parts = [p for p in (first, last) if isinstance(p, str) and p]
    return " ".join(parts) if parts else None


def new_uuid(rng: random.Random) -> str:
    """A version-4-shaped UUID string drawn from `rng`."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
