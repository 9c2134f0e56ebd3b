"""A realistic, deterministic demo store: every tier, every edge the pipeline must handle.

Scenario customers (thresholds, returns, protected groups, CSV-hostile names...) are recorded in
`store.labels` (label -> id) so tests can find them; the rest of the customers are random but
reproducible for a given `seed` and `now`.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from tools.lightspeed_sim.jsonutil import fmt_ts
from tools.lightspeed_sim.store import (
    DEFAULT_GROUP_CODE,
    DEFAULT_GROUP_NAME,
    VERSION_START,
    SimStore,
    customer_name,
    new_uuid,
)

EVERGREEN = "GreenHaus Crew - Evergreen"
BLOOM = "GreenHaus Crew - Bloom"
SPROUT = "GreenHaus Crew - Sprout"
SEED = "GreenHaus Crew - Seed"
FIRST_TIME_BUYER = "First Time Buyer"
TIER_GROUPS = (EVERGREEN, BLOOM, SPROUT, SEED, FIRST_TIME_BUYER)
STAFF = "Staff"
WHOLESALE = "Wholesale"
PLACEHOLDER_EMAIL = "noemail@example.com"

_CENT = Decimal("0.01")
_TAX_FRACTION = Decimal(3) / Decimal(23)  # 15 % GST included in a tax-inclusive price
_FIRST = (
    "Mia", "Liam", "Aroha", "Noah", "Ngaio", "Olivia", "Tane", "Isla", "Wiremu", "Charlotte",
    "Oliver", "Amelia", "Jack", "Ava", "Hemi", "Sophie", "Leo", "Ruby", "Mateo", "Grace",
    "Kauri", "Ella", "Hunter", "Zara", "Nikau", "Lily", "Arlo", "Harper", "Manaia", "Chloe",
    "Finn", "Maia", "Luca", "Anika", "Rangi", "Sienna", "Eli", "Freya", "Tama", "Léa",
)  # fmt: skip
_LAST = (
    "Tane", "Smith", "Williams", "Ngata", "Brown", "Wilson", "Taylor", "Parata", "Anderson", "Thomas",
    "Walker", "Henare", "White", "Harris", "Martin", "Thompson", "Young", "Kingi", "King", "Wright",
    "Campbell", "Tūhoe", "Robinson", "Clarke", "Scott", "Mitchell", "Edwards", "Turner", "Müller", "Chen",
)  # fmt: skip
_STATUS_MIX = (
    ("CLOSED", 86),
    ("LAYBY_CLOSED", 3),
    ("ONACCOUNT_CLOSED", 2),
    ("LAYBY", 2),
    ("ONACCOUNT", 2),
    ("SAVED", 2),
    ("VOIDED", 3),
)
_ATTRIBUTES = {
    "LAYBY": ["layby"],
    "LAYBY_CLOSED": ["layby"],
    "ONACCOUNT": ["onaccount"],
    "ONACCOUNT_CLOSED": ["onaccount"],
}
_QUALIFYING = frozenset({"CLOSED", "LAYBY_CLOSED", "ONACCOUNT_CLOSED"})


def D(text: str | int) -> Decimal:
    """Shorthand for exact money literals."""
    return Decimal(text)


def generate_demo_store(
    seed: int = 42,
    customers: int = 300,
    now: datetime | None = None,
    *,
    missing_tier_groups: tuple[str, ...] = (SEED,),
    placeholder_email_customers: int = 3,
) -> SimStore:
    """Build the demo store; identical output for identical (seed, customers, now, options).

    `customers` is the total number of customers; the ~30 scenario customers are always present,
    so a smaller number still yields every scenario. `now` defaults to the current second (UTC);
    every timestamp in the store is before it.
    """
    if now is None:
        now = datetime.now(UTC)
    now = now.astimezone(UTC).replace(microsecond=0)
    builder = _Builder(seed, now)
    builder.build(customers, missing_tier_groups, placeholder_email_customers)
    return builder.finish()


class _Builder:
    """Accumulates records; versions are assigned at the end in `updated_at` order."""

    def __init__(self, seed: int, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.now = now
        self.latest = now - timedelta(minutes=1)
        self.groups: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.sales: dict[str, dict[str, Any]] = {}
        self.labels: dict[str, str] = {}
        self.group_ids: dict[str, str] = {}
        self.invoice = 1000
        self.outlet_id = self.uid()
        self.register_id = self.uid()
        self.user_ids = [self.uid() for _ in range(3)]
        self.tax_id = self.uid()
        self.tax_rate_id = self.uid()
        self.payment_type_id = self.uid()
        self.product_ids = [self.uid() for _ in range(25)]

    # -- helpers ---------------------------------------------------------------------------------

    def uid(self) -> str:
        return new_uuid(self.rng)

    def code(self, n: int = 4) -> str:
        return "".join(self.rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(n))

    def clamp(self, when: datetime) -> datetime:
        """Keep every timestamp strictly before `now`."""
        return min(when, self.latest)

    def between(self, start: datetime, end: datetime) -> datetime:
        if end <= start:
            return self.clamp(start)
        seconds = int((end - start).total_seconds())
        return self.clamp(start + timedelta(seconds=self.rng.randint(0, seconds)))

    def days_ago(self, lo: float, hi: float) -> datetime:
        return self.between(self.now - timedelta(days=hi), self.now - timedelta(days=lo))

    def amount(self, mu: float = 3.6, sigma: float = 0.65) -> Decimal:
        value = min(max(self.rng.lognormvariate(mu, sigma), 3.5), 450.0)
        return Decimal(str(round(value, 2))).quantize(_CENT)

    # -- groups ----------------------------------------------------------------------------------

    def group(self, name: str, code: str, created: datetime) -> str:
        gid = self.uid()
        ts = fmt_ts(created)
        self.groups[gid] = {
            "id": gid,
            "name": name,
            "group_id": code,
            "created_at": ts,
            "updated_at": ts,
            "deleted_at": None,
            "version": 0,
        }
        self.group_ids[name] = gid
        return gid

    # -- customers -------------------------------------------------------------------------------

    def customer(
        self,
        first: str | None,
        last: str | None,
        group: str = DEFAULT_GROUP_NAME,
        *,
        loyalty: bool | None = None,
        created: datetime | None = None,
        email: str | None | bool = True,
        deleted: bool = False,
        label: str | None = None,
    ) -> str:
        cid = self.uid()
        created = created or self.days_ago(380, 1100)
        stem = "".join(ch for ch in (first or "") if ch.isascii() and ch.isalnum())[:10] or "UNNAMED"
        if email is True:
            local = "".join(ch for ch in f"{first}.{last}".lower() if ch.isascii() and (ch.isalnum() or ch == "."))
            email = f"{local or 'customer'}{self.rng.randint(1, 999)}@example.org"
        elif email is False:
            email = None
        updated = self.between(created, self.now - timedelta(days=1))
        record: dict[str, Any] = {
            "id": cid,
            "customer_code": f"{stem}-{self.code()}",
            "name": customer_name(first, last),
            "first_name": first,
            "last_name": last,
            "email": email,
            "phone": None,
            "mobile": f"+64 21 555 {self.rng.randint(0, 9999):04d}" if self.rng.random() < 0.7 else None,
            "fax": None,
            "company_name": "Kauri Wholesale Ltd" if group == WHOLESALE else None,
            "note": None,
            "gender": self.rng.choice(("M", "F", None)),
            "date_of_birth": f"{self.rng.randint(1950, 2005)}-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}"
            if self.rng.random() < 0.4
            else None,
            "do_not_email": self.rng.random() < 0.1,
            "enable_loyalty": loyalty if loyalty is not None else self.rng.random() < 0.55,
            "enable_promotional_sms": self.rng.random() < 0.2,
            "loyalty_balance": D(0),
            "year_to_date": D(0),
            "balance": D(0),
            "on_account_limit": None,
            "tax_id": None,
            "customer_group_id": self.group_ids[group],
            "physical_address_1": None,
            "physical_address_2": None,
            "physical_suburb": None,
            "physical_city": self.rng.choice(("Auckland", "Wellington", "Christchurch", "Hamilton", None)),
            "physical_postcode": None,
            "physical_state": None,
            "physical_country_id": "NZ",
            "postal_address_1": None,
            "postal_address_2": None,
            "postal_suburb": None,
            "postal_city": None,
            "postal_postcode": None,
            "postal_state": None,
            "postal_country_id": None,
            "custom_field_1": None,
            "custom_field_2": None,
            "custom_field_3": None,
            "custom_field_4": None,
            "twitter": None,
            "website": None,
            "created_at": fmt_ts(created),
            "updated_at": fmt_ts(updated),
            "deleted_at": None,
            "version": 0,
        }
        if deleted:
            deleted_at = self.between(updated, self.now - timedelta(hours=2))
            record["deleted_at"] = fmt_ts(deleted_at)
            record["updated_at"] = fmt_ts(deleted_at)
        self.customers[cid] = record
        if label:
            self.labels[label] = cid
        return cid

    def random_name(self) -> tuple[str, str]:
        return self.rng.choice(_FIRST), self.rng.choice(_LAST)

    # -- sales -----------------------------------------------------------------------------------

    def split(self, incl: Decimal) -> tuple[Decimal, Decimal]:
        """(tax-exclusive price, tax) of a tax-inclusive amount, exact to the cent."""
        tax = (incl * _TAX_FRACTION).quantize(_CENT, rounding=ROUND_HALF_UP)
        return incl - tax, tax

    def line(self, seq: int, price: Decimal, tax: Decimal, *, status: str, is_return: bool) -> dict[str, Any]:
        quantity = -1 if price + tax < 0 else 1
        if quantity == 1 and (price * 100) % 2 == 0 and (tax * 100) % 2 == 0 and self.rng.random() < 0.3:
            quantity = 2
        unit_price = price / quantity
        unit_tax = tax / quantity
        unit_cost = (abs(unit_price) * D("0.45")).quantize(_CENT)
        cost_total = unit_cost * quantity
        return {
            "id": self.uid(),
            "product_id": self.rng.choice(self.product_ids),
            "tax_id": self.tax_id,
            "salesperson_id": None,
            "quantity": quantity,
            "price": unit_price,
            "unit_price": unit_price,
            "price_total": price,
            "total_price": price,
            "discount": 0,
            "unit_discount": 0,
            "discount_total": 0,
            "total_discount": 0,
            "cost": unit_cost,
            "unit_cost": unit_cost,
            "cost_total": cost_total,
            "total_cost": cost_total,
            "tax": unit_tax,
            "unit_tax": unit_tax,
            "tax_total": tax,
            "total_tax": tax,
            "loyalty_value": 0,
            "unit_loyalty_value": 0,
            "total_loyalty_value": 0,
            "tax_components": [{"rate_id": self.tax_rate_id, "total_tax": tax}],
            "promotions": [],
            "surcharges": [],
            "note": None,
            "return_reason": "Changed mind" if is_return else None,
            "price_set": False,
            "status": "SAVED" if status == "SAVED" else "CONFIRMED",
            "sequence": seq,
            "gift_card_number": None,
            "is_return": is_return,
        }

    def lines(self, incl: Decimal, status: str, is_return: bool) -> list[dict[str, Any]]:
        """1-3 lines whose totals add up exactly to `incl`."""
        cents = int(incl * 100)
        count = 1 if abs(cents) < 1000 or incl != incl.quantize(_CENT) else self.rng.choice((1, 1, 2, 3))
        if count == 1:
            parts = [incl]
        else:
            sign = -1 if cents < 0 else 1
            cuts = sorted(self.rng.sample(range(100, abs(cents) - 100), count - 1))
            bounds = [0, *cuts, abs(cents)]
            parts = [Decimal(sign * (b - a)) / 100 for a, b in zip(bounds, bounds[1:], strict=False)]
        out = []
        for seq, part in enumerate(parts):
            price, tax = self.split(part)
            out.append(self.line(seq, price, tax, status=status, is_return=is_return))
        return out

    def sale(
        self,
        customer_id: str | None,
        incl: Decimal,
        sale_date: datetime,
        *,
        status: str = "CLOSED",
        label: str | None = None,
        price_tax: tuple[Decimal, Decimal] | None = None,
        return_for: str | None = None,
        edited_after: timedelta | None = None,
        deleted_after: timedelta | None = None,
        drop_incl: bool = False,
    ) -> str:
        """Add one sale; `edited_after` re-stamps it later (layby closed, note added...)."""
        sid = self.uid()
        self.invoice += 1
        sale_date = self.clamp(sale_date)
        created = self.clamp(sale_date + timedelta(seconds=self.rng.randint(2, 40)))
        updated = created
        if edited_after is not None:
            updated = self.clamp(created + edited_after)
        if price_tax is not None:
            price, tax = price_tax
            lines = [self.line(0, price, tax, status=status, is_return=return_for is not None)]
        else:
            lines = self.lines(incl, status, return_for is not None)
            price = sum((ln["total_price"] for ln in lines), D(0))
            tax = sum((ln["total_tax"] for ln in lines), D(0))
        payments: list[dict[str, Any]] = []
        paid: Decimal | None = None
        if status in _QUALIFYING:
            paid = incl
        elif status in ("LAYBY", "ONACCOUNT") and incl > 0:
            paid = (incl * D("0.2")).quantize(_CENT)
        if paid:
            payments.append(
                {
                    "id": self.uid(),
                    "register_id": self.register_id,
                    "outlet_id": self.outlet_id,
                    "retailer_payment_type_id": self.payment_type_id,
                    "payment_type_id": "1",
                    "name": "Cash",
                    "amount": paid,
                    "payment_date": fmt_ts(updated if status in ("LAYBY_CLOSED", "ONACCOUNT_CLOSED") else sale_date),
                    "deleted_at": None,
                    "external_attributes": [],
                    "source_id": None,
                }
            )
        deleted_at = None
        if deleted_after is not None:
            deleted = self.clamp(updated + deleted_after)
            deleted_at = fmt_ts(deleted)
            updated = deleted
        record: dict[str, Any] = {
            "id": sid,
            "outlet_id": self.outlet_id,
            "register_id": self.register_id,
            "user_id": self.rng.choice(self.user_ids),
            "customer_id": customer_id,
            "invoice_number": str(self.invoice),
            "invoice_sequence": self.invoice,
            "receipt_number": str(self.invoice),
            "source": "USER",
            "source_id": None,
            "status": status,
            "note": "",
            "short_code": self.code(6).lower(),
            "return_for": return_for,
            "return_ids": [],
            "attributes": list(_ATTRIBUTES.get(status, [])),
            "total_price": price,
            "total_tax": tax,
            "total_price_incl": incl,
            "total_loyalty": 0,
            "total_surcharge": 0,
            "sale_date": fmt_ts(sale_date),
            "created_at": fmt_ts(created),
            "updated_at": fmt_ts(updated),
            "deleted_at": deleted_at,
            "version": 0,
            "line_items": lines,
            "payments": payments,
            "taxes": [{"id": self.tax_rate_id, "amount": tax}],
            "adjustments": [],
            "external_applications": [],
            "ecom_custom_charges": {"charges": [], "total": 0, "total_tax": 0, "total_incl": 0},
            "complete_open_sequence_id": None,
            "accounts_transaction_id": None,
            "has_unsynced_on_account_payments": None,
        }
        if drop_incl:
            del record["total_price_incl"]
        self.sales[sid] = record
        if label:
            self.labels[label] = sid
        return sid

    def closed_sales(self, customer_id: str, amounts: list[str], lo_days: float = 40, hi_days: float = 300) -> None:
        for text in amounts:
            self.sale(customer_id, D(text), self.days_ago(lo_days, hi_days))

    def add_return(self, original_id: str, incl: Decimal, after: timedelta, *, label: str | None = None) -> str:
        """A referenced return (negative sale, return_for set); the original gets return_ids and a new version."""
        original = self.sales[original_id]
        when = datetime.fromisoformat(original["sale_date"]) + after
        rid = self.sale(original["customer_id"], -abs(incl), when, return_for=original_id, label=label)
        original["return_ids"].append(rid)
        original["updated_at"] = max(original["updated_at"], self.sales[rid]["created_at"])
        return rid

    # -- the store -------------------------------------------------------------------------------

    def build(self, total: int, missing: tuple[str, ...], placeholders: int) -> None:
        now = self.now
        self.group(DEFAULT_GROUP_NAME, DEFAULT_GROUP_CODE, now - timedelta(days=1200))
        self.group(STAFF, f"Staff-{self.code()}", now - timedelta(days=1100))
        self.group(WHOLESALE, f"Wholesale-{self.code()}", now - timedelta(days=1000))
        for name in TIER_GROUPS:
            if name not in missing:
                stem = "".join(ch for ch in name.split(" - ")[-1] if ch.isalnum())[:10]
                self.group(name, f"{stem}-{self.code()}", now - timedelta(days=420))
        present = [g for g in TIER_GROUPS if g not in missing]

        def tier_group(preferred: str) -> str:
            return preferred if preferred in self.group_ids else DEFAULT_GROUP_NAME

        c = self.customer
        # Exact thresholds (non-qualifying sales alongside, which must not count).
        cid = c("Hana", "Exact", loyalty=True, label="evergreen_exact_1500_00")
        self.closed_sales(cid, ["600.00", "450.50", "449.50"])
        self.sale(cid, D("120.00"), self.days_ago(50, 100), status="VOIDED", edited_after=timedelta(minutes=7))
        self.sale(cid, D("80.00"), self.days_ago(5, 20), status="SAVED")
        cid = c("Rawiri", "Almost", tier_group(BLOOM), loyalty=True, label="bloom_1499_99")
        self.closed_sales(cid, ["700.00", "799.99"])
        self.sale(cid, D("50.00"), self.days_ago(60, 90), deleted_after=timedelta(hours=3), label="sale_deleted_closed")
        cid = c("Pita", "Halfcent", loyalty=False, label="evergreen_1499_995")
        self.sale(
            cid,
            D("1499.995"),
            self.days_ago(60, 200),
            price_tax=(D("1304.343"), D("195.652")),
            label="sale_1499_995",
        )
        cid = c("Moana", "Seven", tier_group(SPROUT), loyalty=True, label="bloom_exact_750_00")
        self.closed_sales(cid, ["500.00", "250.00"])
        cid = c("Kiri", "Under", loyalty=True, label="sprout_749_99")
        self.closed_sales(cid, ["349.99", "400.00"])
        cid = c("Ari", "Quarter", tier_group(FIRST_TIME_BUYER), loyalty=False, label="sprout_exact_250_00")
        self.closed_sales(cid, ["250.00"])
        cid = c("Nia", "Seedling", loyalty=True, label="seed_249_99")
        self.closed_sales(cid, ["249.99"])
        cid = c("Tom", "Once", loyalty=False, label="first_time_buyer_249_99")
        self.closed_sales(cid, ["249.99"])
        # The 30-day window: [as_of - 30 days, as_of) with as_of = now.
        cid = c("Sam", "Frequent", loyalty=False, label="sprout_by_frequency")
        self.sale(cid, D("15.00"), now - timedelta(days=30), label="sale_window_start")
        self.sale(cid, D("15.00"), now - timedelta(days=12))
        self.sale(cid, D("15.00"), now - timedelta(days=2))
        cid = c("Jo", "Edge", loyalty=False, label="window_edge_not_sprout")
        self.sale(cid, D("15.00"), now - timedelta(days=30, seconds=1), label="sale_window_just_outside")
        self.sale(cid, D("15.00"), now - timedelta(days=10))
        self.sale(cid, D("15.00"), now - timedelta(days=3))
        # Returns and refunds.
        cid = c("Eru", "Returner", tier_group(BLOOM), loyalty=True, label="return_drops_below_bloom")
        first = self.sale(cid, D("800.00"), self.days_ago(100, 150))
        self.add_return(first, D("100.00"), timedelta(days=6), label="sale_referenced_return")
        cid = c("Lena", "Refund", loyalty=True, label="unreferenced_refund")
        self.closed_sales(cid, ["300.00"])
        self.sale(cid, D("-60.00"), self.days_ago(20, 35), label="sale_unreferenced_refund")
        # Protected groups with big spend.
        cid = c("Ben", "Staffer", STAFF, loyalty=True, label="staff_high_spender")
        self.closed_sales(cid, ["900.00", "850.00", "850.00"])
        cid = c("Kauri", "Trade", WHOLESALE, loyalty=False, email="orders@kauri-wholesale.example", label="wholesale_high_spender")
        for text in ("1200.00", "1400.00", "1300.00", "1300.00"):
            self.sale(cid, D(text), self.days_ago(40, 300), status="ONACCOUNT_CLOSED", edited_after=timedelta(days=14))
        cid = c("Vera", "Shopper", WHOLESALE, loyalty=False, label="wholesale_low_spender")
        self.closed_sales(cid, ["45.00"])
        # Wrong tier groups.
        cid = c("Quinn", "Misplaced", tier_group(FIRST_TIME_BUYER), loyalty=True, label="wrong_tier_group_big_spender")
        self.closed_sales(cid, ["1000.00", "1100.00"])
        c("Noa", "Nothing", tier_group(BLOOM), loyalty=True, label="no_purchases_in_tier_group")
        # Deleted customer with spend; orphan and walk-in sales.
        cid = c("Del", "Eted", loyalty=True, deleted=True, label="deleted_customer_with_sales")
        self.closed_sales(cid, ["1000.00", "1000.00"], lo_days=60)
        self.sale(self.uid(), D("99.00"), self.days_ago(10, 50), label="sale_unknown_customer")
        for i in range(8):
            self.sale(None, self.amount(), self.days_ago(1, 360), label="sale_walk_in" if i == 0 else None)
        # CSV-hostile names.
        cid = c('Zoë "Zed"', "O'Brien, Jr.", loyalty=True, label="csv_hostile_comma_quote")
        self.closed_sales(cid, ["120.00", "200.00"])
        cid = c("Ana\nMaría", "Núñez-Ōtaki", loyalty=True, label="csv_hostile_newline")
        self.closed_sales(cid, ["90.00"])
        # Placeholder emails shared by several customers.
        for i in range(placeholders):
            cid = c(*self.random_name(), email=PLACEHOLDER_EMAIL, label=f"placeholder_email_{i + 1}")
            self.closed_sales(cid, [str(self.amount())])
        # Statuses that do not count, and ones that do once closed.
        cid = c("Lay", "Byopen", loyalty=True, label="open_layby_and_onaccount_only")
        self.sale(cid, D("780.00"), self.days_ago(10, 20), status="LAYBY", edited_after=timedelta(days=2))
        self.sale(cid, D("300.00"), self.days_ago(5, 9), status="ONACCOUNT")
        cid = c("Lay", "Byclosed", loyalty=True, label="layby_closed_bloom")
        self.sale(cid, D("780.00"), self.days_ago(100, 200), status="LAYBY_CLOSED", edited_after=timedelta(days=30))
        cid = c("Onno", "Account", loyalty=False, label="onaccount_closed_sprout")
        self.sale(cid, D("300.00"), self.days_ago(60, 120), status="ONACCOUNT_CLOSED", edited_after=timedelta(days=10))
        cid = c("Ina", "Taxonly", loyalty=True, label="missing_total_price_incl")
        self.sale(cid, D("130.00"), self.days_ago(40, 200), drop_incl=True, label="sale_missing_total_price_incl")
        self.sale(cid, D("130.00"), self.days_ago(40, 200), drop_incl=True)
        cid = c("Ed", "Ited", loyalty=True, label="edited_sale_customer")
        self.sale(cid, D("64.50"), self.days_ago(60, 80), edited_after=timedelta(days=20), label="sale_edited")
        c("Newbie", "Nosales", loyalty=True, created=self.days_ago(1, 5), email=False, label="no_purchases_recent")

        self.random_customers(max(0, total - len(self.customers)), present)
        self.year_to_date()

    def random_customers(self, count: int, present_tier_groups: list[str]) -> None:
        profiles = (("none", 22), ("one", 18), ("occasional", 30), ("regular", 18), ("vip", 12))
        names = [p for p, _ in profiles]
        weights = [w for _, w in profiles]
        statuses = [s for s, _ in _STATUS_MIX]
        status_weights = [w for _, w in _STATUS_MIX]
        for _ in range(count):
            roll = self.rng.random()
            if roll < 0.12 and present_tier_groups:
                group = self.rng.choice(present_tier_groups)
            elif roll < 0.15:
                group = STAFF
            elif roll < 0.17:
                group = WHOLESALE
            else:
                group = DEFAULT_GROUP_NAME
            first, last = self.random_name()
            created = self.days_ago(20, 1100)
            cid = self.customer(first, last, group, created=created, deleted=self.rng.random() < 0.03)
            profile = self.rng.choices(names, weights)[0]
            n, mu = {
                "none": (0, 3.6),
                "one": (1, 3.8),
                "occasional": (self.rng.randint(2, 5), 3.6),
                "regular": (self.rng.randint(6, 15), 3.7),
                "vip": (self.rng.randint(16, 35), 4.2),
            }[profile]
            start = max(created + timedelta(hours=1), self.now - timedelta(days=365))
            for _ in range(n):
                self.random_sale(cid, start, mu, statuses, status_weights)
            if profile != "none" and self.rng.random() < 0.06:  # a recent streak: 3+ in 30 days
                for _ in range(self.rng.randint(3, 5)):
                    self.sale(cid, self.amount(3.0, 0.4), self.days_ago(0.1, 29))

    def random_sale(self, cid: str, start: datetime, mu: float, statuses: list[str], weights: list[int]) -> None:
        status = self.rng.choices(statuses, weights)[0]
        when = self.between(start, self.now - timedelta(hours=1))
        incl = self.amount(mu)
        edited = None
        deleted = None
        if status in ("LAYBY_CLOSED", "ONACCOUNT_CLOSED"):
            edited = timedelta(days=self.rng.randint(3, 40))
        elif status == "VOIDED":
            edited = timedelta(minutes=self.rng.randint(1, 600))
        elif status == "SAVED" and self.rng.random() < 0.4:
            deleted = timedelta(hours=self.rng.randint(1, 48))
        elif status == "CLOSED" and self.rng.random() < 0.05:
            edited = timedelta(hours=self.rng.randint(1, 200))
        sid = self.sale(
            cid,
            incl,
            when,
            status=status,
            edited_after=edited,
            deleted_after=deleted,
            drop_incl=status == "CLOSED" and self.rng.random() < 0.02,
        )
        if status == "CLOSED" and incl >= 20 and self.rng.random() < 0.04:
            part = incl if self.rng.random() < 0.5 else (incl / 2).quantize(_CENT)
            self.add_return(sid, part, timedelta(days=self.rng.randint(1, 20), hours=self.rng.randint(0, 8)))
        elif status == "CLOSED" and self.rng.random() < 0.005:
            self.sale(cid, -self.amount(3.0, 0.5), self.between(when, self.now - timedelta(hours=1)))

    def year_to_date(self) -> None:
        """Fill `year_to_date` and `loyalty_balance` from the sales (cosmetic, but consistent)."""
        year = str(self.now.year)
        for sale in self.sales.values():
            customer = self.customers.get(sale["customer_id"] or "")
            if customer is None or sale["deleted_at"] or sale["status"] not in _QUALIFYING:
                continue
            amount = sale.get("total_price_incl", sale["total_price"] + sale["total_tax"])
            if sale["sale_date"].startswith(year):
                customer["year_to_date"] += amount
            if customer["enable_loyalty"] and amount > 0:
                customer["loyalty_balance"] += (amount * D("0.02")).quantize(_CENT)

    def finish(self) -> SimStore:
        """Assign global versions in `updated_at` order (groups first on ties) and build the store."""
        kinds = ((0, self.groups), (1, self.customers), (2, self.sales))
        ordered = sorted(
            ((rec["updated_at"], kind, rec["id"], rec) for kind, recs in kinds for rec in recs.values()),
            key=lambda item: item[:3],
        )
        version = VERSION_START + self.rng.randint(1_000_000, 900_000_000)
        for _, _, _, rec in ordered:
            rec["version"] = version
            version += self.rng.randint(1, 97)
        return SimStore(
            customers=self.customers,
            groups=self.groups,
            sales=self.sales,
            next_version=version,
            time_floor=self.now,
            seed=self.rng.randint(0, 2**31),
            labels=self.labels,
        )
