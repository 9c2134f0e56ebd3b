"""The approval of a mass change (include/tier_sync/approval.py and its task bodies in tasks.py).

Pure parts (request text, sample, decision records, settings) directly; the task bodies against a
data dir holding a plan.json; the operator's routing with Airflow's HITL calls stubbed (the real
scheduler, REST API and UI are tests/integration/test_approval.py). Every timestamp is fixed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from include.tier_sync import approval, settings
from include.tier_sync.ledger import RunPaths
from include.tier_sync.sync.batches import plan_path, read_plan_doc, write_plan_doc
from include.tier_sync.sync.plan import Move

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 25, 2, tzinfo=UTC)
ASKED = datetime(2026, 11, 25, 2, 40, tzinfo=UTC)
SAMPLE_ROW = {"customer_id": "c", "from": "Bloom", "to": "Seed", "direction": "downgrade", "lifetime_value": "1.00"}


def move(cid: str, source: str, target: str, source_gid: str | None = None) -> Move:
    return Move(cid, target, f"g-{target}", source_gid or f"g-{source}", source)


def blocked_plan(**approval_fields: Any) -> dict[str, Any]:
    """plan.json as plan_sync leaves it when the breaker stopped a writing run."""
    return {
        "format": "tier-sync-plan/1",
        "plan_id": "p-blocked",
        "as_of": "2026-11-25T02:00:00Z",
        "customers_cursor": 7,
        "refs": [],
        "summary": {
            "managed": 200,
            "planned_moves": 120,
            "downgrades": 20,
            "moves": {"All Customers->Seed": 90, "Seed->Bloom": 10, "Bloom->Seed": 20},
            "circuit_breaker": {
                "tripped": True,
                "reasons": ["120 changes exceed 20% of 200 managed customers"],
                "changes": 120,
                "managed": 200,
                "change_fraction": 0.6,
                "max_move_fraction": 0.2,
                "downgrades": 20,
                "max_downgrades": 500,
            },
        },
        "groups": None,
        "dispatched": False,
        "writes_allowed": False,
        "skipped_reason": "circuit_breaker",
        "approval": {"status": "requested", "requested_at": "2026-11-25T02:31:00Z", "sample": [], **approval_fields},
    }


# -- settings ----------------------------------------------------------------------------------


def test_approval_timeout_setting() -> None:
    assert settings.check_approval_timeout(None) == timedelta(hours=12)
    assert settings.check_approval_timeout("  ") == timedelta(hours=12)
    assert settings.check_approval_timeout("0.5") == timedelta(minutes=30)
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(ValueError, match=settings.VAR_APPROVAL_TIMEOUT):
            settings.check_approval_timeout(bad)


def test_approvers_setting() -> None:
    assert settings.check_approvers(None) == [] and settings.check_approvers("") == []
    assert settings.check_approvers("alice, bob,alice") == ["alice", "bob"]
    assert settings.check_approvers('["ops-lead", "admin"]') == ["ops-lead", "admin"]
    for bad in ("alice,,bob", "al ice", '["a", 3]', "[broken"):
        with pytest.raises(ValueError, match=settings.VAR_APPROVERS):
            settings.check_approvers(bad)


# -- the request -------------------------------------------------------------------------------


def test_only_a_blocked_writing_plan_awaiting_a_decision_asks() -> None:
    assert approval.needs_approval(blocked_plan())
    assert not approval.needs_approval(None)
    assert not approval.needs_approval({**blocked_plan(), "dispatched": True})
    assert not approval.needs_approval({**blocked_plan(), "skipped_reason": "dry_run"})
    # Refused before, and approve_sync cleared: it asks again.
    assert approval.needs_approval({**blocked_plan(), "skipped_reason": "approval aborted",
                                    "approval": {"status": "aborted"}})
    legacy = blocked_plan()
    del legacy["approval"]  # a plan of an older version stopped by the breaker: nothing to answer
    assert not approval.needs_approval(legacy)


def test_direction_of_each_transition() -> None:
    assert approval.direction("Seed->Bloom") == "upgrade"
    assert approval.direction("Evergreen->Seed") == "downgrade"
    assert approval.direction("All Customers->Seed") == "new tier"
    assert approval.direction("Bloom->Bloom") == "re-assert"


def test_sample_shows_the_largest_values_downgrades_first_and_is_reproducible() -> None:
    changes = [move(f"u{i}", "All Customers", "Seed", "g-all") for i in range(8)]
    changes += [move("d1", "Evergreen", "Seed"), move("d2", "Bloom", "Sprout")]
    values = {f"u{i}": f"{100 + i}.00" for i in range(8)} | {"d1": "40.00", "d2": "1,900.50"}
    sample = approval.pick_sample(changes, values, size=4)
    assert [s["customer_id"] for s in sample] == ["d2", "d1", "u7", "u6"]
    assert sample[0] == {
        "customer_id": "d2", "from": "Bloom", "to": "Sprout", "direction": "downgrade", "lifetime_value": "1,900.50",
    }
    assert approval.pick_sample(list(reversed(changes)), values, size=4) == sample
    # Fewer downgrades than half: the others fill the sample; no values: still a sample.
    assert len(approval.pick_sample(changes[:3], {}, size=10)) == 3


def test_request_text_says_what_would_happen() -> None:
    doc = blocked_plan(sample=[{"customer_id": "c-9", "from": "Bloom", "to": "Seed", "lifetime_value": "812.00"}])
    subject, body = approval.request_text(
        doc,
        deadline=ASKED + timedelta(hours=12),
        plan_location="/data/runs/20261125T020000Z/sync_plan/plan.json",
        run_link="http://ui/dags/customer_tier_sync/runs/r1",
        data_docs_link="http://ui/loyalty-tiers/data-docs/",
        approvers=["ops-lead"],
    )
    assert subject == "Approve the tier sync: 120 of 200 managed customers (60.0%) would change group"
    for text in (
        "120 changes exceed 20% of 200 managed customers",
        "**20 downgrades**",
        "| Bloom → Seed | downgrade | 20 |",
        "| All Customers → Seed | new tier | 90 |",
        "By direction: downgrade 20, new tier 90, upgrade 10",
        "| c-9 | Bloom | Seed | 812.00 |",
        "No answer by **2026-11-25T14:40:00Z** writes nothing",
        "Who may answer: ops-lead.",
        "Plan: `/data/runs/20261125T020000Z/sync_plan/plan.json`",
        "Data Docs: http://ui/loyalty-tiers/data-docs/",
        "Run: http://ui/dags/customer_tier_sync/runs/r1",
    ):
        assert text in body, text


def test_a_deadline_past_the_runs_own_timeout_is_refused() -> None:
    run_deadline = ASKED + timedelta(hours=14)
    approval.check_deadline(ASKED + timedelta(hours=12), run_deadline, timedelta(hours=1))
    approval.check_deadline(ASKED + timedelta(hours=12), None, timedelta(hours=1))
    with pytest.raises(ValueError, match="tier_sync_approval_timeout_hours.*TIER_SYNC_DAGRUN_TIMEOUT_HOURS"):
        approval.check_deadline(ASKED + timedelta(hours=13, minutes=1), run_deadline, timedelta(hours=1))


# -- the decision ------------------------------------------------------------------------------


def answer(option: str, comment: str = "") -> dict[str, Any]:
    return {
        "chosen_options": [option],
        "params_input": {"comment": comment},
        "responded_at": ASKED + timedelta(minutes=5),
        "responded_by_user": {"id": "ops-lead", "name": "Ops Lead"},
        "timedout": False,
    }


def test_decisions_record_who_when_which_and_why() -> None:
    requested = {"status": "requested", "deadline": "2026-11-25T14:40:00Z", "sample": [{"customer_id": "c"}]}
    apply_all = approval.decision_record(answer("Apply all", "onboarding"), requested=requested, decided_at=ASKED)
    assert apply_all == {
        "deadline": "2026-11-25T14:40:00Z",
        "sample": [{"customer_id": "c"}],
        "status": "approved_all",
        "option": "Apply all",
        "responded_by": {"id": "ops-lead", "name": "Ops Lead"},
        "responded_at": "2026-11-25T02:45:00Z",
        "comment": "onboarding",
    }
    assert approval.refusal_message(apply_all) is None and not approval.only_upgrades(apply_all)
    upgrades = approval.decision_record(answer("Apply upgrades only"), requested=requested, decided_at=ASKED)
    assert approval.only_upgrades(upgrades) and upgrades["comment"] is None
    assert approval.refusal_message(upgrades) is None

    aborted = approval.decision_record(answer("Abort", "wrong rules"), requested=requested, decided_at=ASKED)
    assert aborted["status"] == "aborted"
    assert approval.refusal_message(aborted) == (
        "The mass-change approval was aborted by Ops Lead at 2026-11-25T02:45:00Z (wrong rules). "
        "Nothing was written to Lightspeed; see tier_sync_log.json."
    )
    timeout_event = {"error": "The Human-in-the-loop response timeout has passed without a response.", "error_type": "timeout"}
    timed_out = approval.decision_record(timeout_event, requested=requested, decided_at=ASKED + timedelta(hours=12))
    assert timed_out["status"] == "timed_out" and timed_out["responded_by"] is None
    assert timed_out["responded_at"] == "2026-11-25T14:40:00Z"
    assert "was not answered by its deadline 2026-11-25T14:40:00Z" in str(approval.refusal_message(timed_out))
    with pytest.raises(ValueError, match="exactly one of"):
        approval.decision_record({**answer("Abort"), "chosen_options": ["Abort", "Apply all"]}, requested=None, decided_at=ASKED)


# -- the task bodies against a data dir ----------------------------------------------------------


class FakeTI:
    def __init__(self, pulled: Any = None) -> None:
        self.pulled = pulled

    def xcom_pull(self, task_ids: str) -> Any:
        assert task_ids == "plan_sync"
        return self.pulled


def context(ti: FakeTI | None = None, *, started: datetime = ASKED, run_hours: float = 20) -> dict[str, Any]:
    dag_run = SimpleNamespace(run_id="scheduled__r1", dag_id="customer_tier_sync", run_type="scheduled", start_date=started)
    return {
        "data_interval_start": AS_OF - timedelta(days=1),
        "data_interval_end": AS_OF,
        "logical_date": AS_OF - timedelta(days=1),
        "run_id": "scheduled__r1",
        "dag_run": dag_run,
        "dag": SimpleNamespace(dag_id="customer_tier_sync", dagrun_timeout=timedelta(hours=run_hours)),
        "ti": ti or FakeTI(),
        "params": {},
    }


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunPaths:
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(tmp_path))
    for name in (settings.VAR_APPROVAL_TIMEOUT, settings.VAR_APPROVERS):
        monkeypatch.delenv(f"AIRFLOW_VAR_{name.upper()}", raising=False)
    return RunPaths(str(tmp_path), AS_OF)


def test_no_question_without_a_blocked_plan_refs_pass_on(data_dir: RunPaths) -> None:
    from include.tier_sync.tasks import approval_request

    refs = [{"ref": "b1.json", "tier": "Seed", "group_id": "g", "size": 3, "batch": "batch 1/1", "writes_allowed": True}]
    assert approval_request(context(FakeTI(refs)), now=ASKED) == {"refs": refs}  # no plan.json
    write_plan_doc(data_dir, {**blocked_plan(), "skipped_reason": "dry_run"})
    assert approval_request(context(FakeTI([])), now=ASKED) == {"refs": []}


def test_request_is_recorded_and_sent(data_dir: RunPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    from include.tier_sync import alerts
    from include.tier_sync.tasks import approval_request

    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(alerts, "send_alert", lambda subject, text, ctx=None, **_: sent.append((subject, text)) or {})
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_APPROVERS", "ops-lead,admin")
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_APPROVAL_TIMEOUT_HOURS", "2")
    write_plan_doc(data_dir, blocked_plan())
    request = approval_request(context(), now=ASKED + timedelta(minutes=1))
    assert request["refs"] is None and request["approvers"] == ["ops-lead", "admin"]
    assert request["timeout"] == timedelta(hours=2)
    assert request["subject"].startswith("Approve the tier sync: 120 of 200")
    assert plan_path(data_dir) in request["body"]
    recorded = (read_plan_doc(data_dir) or {})["approval"]
    assert recorded["status"] == "requested" and recorded["approvers"] == ["ops-lead", "admin"]
    assert recorded["deadline"] == "2026-11-25T04:41:00Z" and recorded["requested_at"] == "2026-11-25T02:31:00Z"
    assert len(sent) == 1 and sent[0][0].startswith("Approval needed: Approve the tier sync")
    # Cleared after an abort: asked again, the old answer dropped from the open request.
    write_plan_doc(data_dir, {**blocked_plan(), "skipped_reason": "approval aborted",
                              "approval": {"status": "aborted", "option": "Abort", "sample": [SAMPLE_ROW]}})
    assert approval_request(context(), now=ASKED)["refs"] is None
    reasked = read_plan_doc(data_dir) or {}
    assert reasked["skipped_reason"] == "circuit_breaker"
    assert reasked["approval"] == {"status": "requested", "sample": [SAMPLE_ROW],
                                   "deadline": "2026-11-25T04:40:00Z", "approvers": ["ops-lead", "admin"]}
    assert "/tasks/approve_sync/required_actions" in sent[0][1]


def test_request_outlasting_the_run_fails_before_asking(data_dir: RunPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from include.tier_sync.tasks import approval_request

    write_plan_doc(data_dir, blocked_plan())
    started = ASKED - timedelta(hours=10)  # the run's own 20 h end in 10 h: 12 h do not fit
    with pytest.raises(AirflowFailException, match="ends after the run's own timeout"):
        approval_request(context(started=started), now=ASKED)
    assert (read_plan_doc(data_dir) or {})["approval"]["status"] == "requested"  # nothing was asked


@pytest.mark.parametrize(
    ("event", "status", "message"),
    [
        (answer("Abort", "not today"), "aborted", "aborted by Ops Lead"),
        ({"error": "The Human-in-the-loop response timeout has passed without a response.", "error_type": "timeout"},
         "timed_out", "was not answered by its deadline"),
    ],
)
def test_refusal_writes_the_decision_and_fails(data_dir: RunPaths, event: dict[str, Any], status: str, message: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from include.tier_sync.sync.log import finish_sync
    from include.tier_sync.tasks import approval_answered

    write_plan_doc(data_dir, blocked_plan(deadline="2026-11-25T14:40:00Z"))
    with pytest.raises(AirflowFailException, match=message):
        approval_answered(context(), event, now=ASKED + timedelta(hours=12))
    doc = read_plan_doc(data_dir) or {}
    assert doc["dispatched"] is False and doc["skipped_reason"] == f"approval {status}"
    assert doc["approval"]["status"] == status
    log = finish_sync(data_dir, {"run_id": "scheduled__r1", "as_of": AS_OF})
    assert log["synced"] is False and log["updated"] == 0 and log["approval"]["status"] == status
    assert log["skipped_reason"] == f"approval {status}"
    assert json.loads(Path(data_dir.run_sync_log).read_text())["approval"] == doc["approval"]


def test_approval_of_a_plan_whose_store_moved_on_fails_before_planning(data_dir: RunPaths) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from include.tier_sync.tasks import approval_answered

    write_plan_doc(data_dir, blocked_plan())  # made at customers cursor 7; the (empty) store is at 0
    with pytest.raises(AirflowFailException, match="order store changed since the approved plan"):
        approval_answered(context(), answer("Apply all"), now=ASKED)


# -- the operator --------------------------------------------------------------------------------


def test_operator_passes_refs_on_or_parks_with_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.standard.operators import hitl
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import TaskAwaitingInput

    from include.tier_sync import tasks

    op = approval.SyncApprovalOperator(task_id="approve_sync")
    assert op.options == approval.OPTIONS and op.defaults is None and op.multiple is False
    assert list(op.params) == ["comment"]
    ctx = {"task_instance": SimpleNamespace(id="ti-1")}

    monkeypatch.setattr(tasks, "approval_request", lambda c: {"refs": [{"ref": "b"}]})
    assert op.execute(ctx) == [{"ref": "b"}]

    upserted: list[dict[str, Any]] = []
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kw: upserted.append(kw))
    request = {"refs": None, "subject": "S", "body": "B", "approvers": ["ops-lead"], "timeout": timedelta(hours=2)}
    monkeypatch.setattr(tasks, "approval_request", lambda c: request)
    # In a worker the task's params hold the DAG's trigger params again: the form must not show them.
    op.params = ParamsDict({"dry_run": Param(False, type="boolean", source="dag"), **dict(op.params.items())})
    with pytest.raises(TaskAwaitingInput) as parked:
        op.execute(ctx)
    assert list(upserted[0]["params"]) == ["comment"]
    assert upserted[0]["params"]["comment"]["schema"]["type"] == ["null", "string"]  # optional
    assert parked.value.timeout == timedelta(hours=2) and parked.value.method_name == "execute_complete"
    assert upserted[0]["subject"] == "S" and upserted[0]["body"] == "B"
    assert upserted[0]["assigned_users"] == [{"id": "ops-lead", "name": "ops-lead"}]
    assert upserted[0]["options"] == approval.OPTIONS and upserted[0]["defaults"] is None

    seen: list[Any] = []
    monkeypatch.setattr(tasks, "approval_answered", lambda c, e: seen.append(e) or [{"ref": "b"}])
    assert op.execute_complete(ctx, answer("Apply all")) == [{"ref": "b"}]
    with pytest.raises(ValueError, match="not in"):
        op.execute_complete(ctx, answer("Apply everything"))
    assert len(seen) == 1
