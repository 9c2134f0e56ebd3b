"""The approval of a mass change: when the circuit breaker trips, the run asks a person.

`plan_sync` no longer fails on a tripped breaker: it writes ``plan.json`` with ``dispatched:
false`` and an approval *request* (a sample of the moves), and ``approve_sync`` (the
`SyncApprovalOperator` below, Airflow's human-in-the-loop operator) asks under "Required actions":

* **Apply all**: the same plan is written (re-planned from the same files, with the breaker
  overridden, and checked to be the plan that was shown);
* **Apply upgrades only**: only the upgrades (`Plan.upgrades_only`); what was left out is in the
  plan and the sync log (``left_out_by_approval``);
* **Abort**, or no answer before the deadline (Variable ``tier_sync_approval_timeout_hours``,
  default 12 h): nothing is written, the decision (who, when, which option, the comment) goes into
  plan.json and the sync log, and the task fails with a clear message (its failure alert is the
  run's one alert).

Who may answer: the Variable ``tier_sync_approvers`` (Airflow user ids), else whoever the auth
manager lets answer this DAG's required actions. The request itself is sent on the alert channels.
A run that did not trip the breaker, a dry run and ``allow_mass_change`` never ask.

The functions here are pure (plan documents in, text and records out); the operator is the thin
Airflow layer, and the task bodies it calls are in `include.tier_sync.tasks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict

from include.tier_sync import settings
from include.tier_sync.rules import TIERS
from include.tier_sync.runtime import iso, to_utc

if TYPE_CHECKING:
    from include.tier_sync.sync.plan import Move

TASK_ID = "approve_sync"
APPLY_ALL = "Apply all"
UPGRADES_ONLY = "Apply upgrades only"
ABORT = "Abort"
OPTIONS = [APPLY_ALL, UPGRADES_ONLY, ABORT]
COMMENT = "comment"
SAMPLE_SIZE = 10

REQUESTED = "requested"
NOT_NEEDED = "not_needed"
DECISIONS = {APPLY_ALL: "approved_all", UPGRADES_ONLY: "approved_upgrades_only", ABORT: "aborted"}
TIMED_OUT = "timed_out"
REFUSED = frozenset({"aborted", TIMED_OUT})


class ApprovalRefused(RuntimeError):
    """The mass change was aborted, rejected or not answered in time: nothing was written."""


# -- the request -------------------------------------------------------------------------------


def needs_approval(doc: Mapping[str, Any] | None) -> bool:
    """True when plan.json is a writing run stopped by the breaker that was not dispatched: a new
    request, or one refused or timed out before (approve_sync was cleared: it asks again)."""
    if not doc or doc.get("dispatched", True) or not isinstance(doc.get("approval"), Mapping):
        return False
    reason = str(doc.get("skipped_reason") or "")
    return reason == "circuit_breaker" or reason.startswith("approval")


def asking(approval: Mapping[str, Any] | None, *, deadline: datetime, approvers: Sequence[str]) -> dict[str, Any]:
    """plan.json's ``approval`` while a person is asked (an earlier answer, if any, is dropped)."""
    kept = {k: v for k, v in (approval or {}).items() if k in ("requested_at", "sample")}
    return {**kept, "status": REQUESTED, "deadline": iso(to_utc(deadline)), "approvers": list(approvers)}


def direction(key: str) -> str:
    """"upgrade", "downgrade", "new tier" (from the default group), or "re-assert" of a "from->to" key."""
    source, _, target = key.partition("->")
    if source == target:
        return "re-assert"
    if source not in TIERS:
        return "new tier"
    return "downgrade" if TIERS.index(target) > TIERS.index(source) else "upgrade"


def _cents(value: Any) -> int:
    try:
        return round(float(str(value).replace(",", "").replace("$", "")) * 100)
    except ValueError:
        return 0


def pick_sample(changes: Sequence[Move], lifetime_values: Mapping[str, Any], size: int = SAMPLE_SIZE) -> list[dict[str, Any]]:
    """A reproducible sample of the changes to show a person: the largest lifetime values among the
    downgrades (up to half the sample), then among the other changes; each with from/to and value."""

    def rank(moves: Sequence[Move]) -> list[Move]:
        return sorted(moves, key=lambda m: (-_cents(lifetime_values.get(m.customer_id)), m.customer_id))

    downgrades = rank([m for m in changes if m.is_downgrade])
    others = rank([m for m in changes if not m.is_downgrade])
    take_down = min(len(downgrades), max(size // 2, size - len(others)))
    chosen = downgrades[:take_down] + others[: size - take_down]
    return [
        {
            "customer_id": m.customer_id,
            "from": m.from_label,
            "to": m.tier,
            "direction": direction(m.key),
            "lifetime_value": None if lifetime_values.get(m.customer_id) is None else str(lifetime_values[m.customer_id]),
        }
        for m in chosen
    ]


def request_record(sample: Sequence[Mapping[str, Any]], requested_at: datetime) -> dict[str, Any]:
    """plan.json's ``approval`` while the question is open."""
    return {"status": REQUESTED, "requested_at": iso(to_utc(requested_at)), "sample": [dict(s) for s in sample]}


def request_text(
    doc: Mapping[str, Any],
    *,
    deadline: datetime,
    plan_location: str,
    run_link: str | None,
    data_docs_link: str | None,
    approvers: Sequence[str],
) -> tuple[str, str]:
    """The subject and the Markdown body of the request (no names, emails or phones: ids only)."""
    summary = doc.get("summary") or {}
    breaker = summary.get("circuit_breaker") or {}
    moves: Mapping[str, int] = summary.get("moves") or {}
    by_direction: dict[str, int] = {}
    for key, count in moves.items():
        by_direction[direction(key)] = by_direction.get(direction(key), 0) + int(count)
    changes = int(breaker.get("changes") or 0)
    managed = int(breaker.get("managed") or summary.get("managed") or 0)
    share = f"{changes / managed:.1%}" if managed else "n/a"
    subject = f"Approve the tier sync: {changes} of {managed} managed customers ({share}) would change group"
    lines = [
        "The circuit breaker stopped this sync before anything was written to Lightspeed:",
        *[f"- {r}" for r in breaker.get("reasons") or []],
        "",
        f"**{changes} changes** ({share} of {managed} managed customers; the limit is "
        f"{float(breaker.get('max_move_fraction') or 0):.0%}), **{int(summary.get('downgrades') or 0)} downgrades** "
        f"(limit {breaker.get('max_downgrades')}).",
        "",
        "| move | direction | customers |",
        "|---|---|---|",
        *[f"| {key.replace('->', ' → ')} | {direction(key)} | {count} |" for key, count in moves.items()],
        "",
        "By direction: " + (", ".join(f"{d} {n}" for d, n in sorted(by_direction.items())) or "none"),
    ]
    sample = (doc.get("approval") or {}).get("sample") or []
    if sample:
        lines += ["", "Sample (largest lifetime values, downgrades first):", "",
                  "| customer id | from | to | lifetime value |", "|---|---|---|---|"]
        lines += [f"| {s['customer_id']} | {s['from']} | {s['to']} | {s.get('lifetime_value') or ''} |" for s in sample]
    lines += [
        "",
        f"Options: **{APPLY_ALL}** writes the whole plan; **{UPGRADES_ONLY}** writes the upgrades (and "
        "new tiers) and leaves every downgrade out; **Abort** writes nothing.",
        f"No answer by **{iso(to_utc(deadline))}** writes nothing (like Abort) and alerts.",
        f"Who may answer: {', '.join(approvers) if approvers else 'anyone allowed to act on this DAG'}.",
        "",
        f"- Plan: `{plan_location}`",
    ]
    if data_docs_link:
        lines.append(f"- Data Docs: {data_docs_link}")
    if run_link:
        lines.append(f"- Run: {run_link}")
    return subject, "\n".join(lines)


def check_deadline(deadline: datetime, run_deadline: datetime | None, reserve: timedelta) -> None:
    """Refuse (ValueError) a request whose deadline the run's own dagrun_timeout would cut short."""
    if run_deadline is not None and deadline + reserve > run_deadline:
        raise ValueError(
            f"The approval deadline {iso(to_utc(deadline))} (Variable {settings.VAR_APPROVAL_TIMEOUT}) plus "
            f"{reserve} for the sync ends after the run's own timeout ({iso(to_utc(run_deadline))}, "
            f"{settings.ENV_DAGRUN_TIMEOUT}); lower the Variable or raise the run timeout. Nothing was written."
        )


# -- the decision ------------------------------------------------------------------------------


def decision_record(
    event: Mapping[str, Any], *, requested: Mapping[str, Any] | None, decided_at: datetime
) -> dict[str, Any]:
    """plan.json's ``approval`` once answered (or timed out), from the HITL resume event."""
    base = {k: v for k, v in (requested or {}).items() if k in ("requested_at", "deadline", "sample")}
    if "error" in event:
        timed_out = event.get("error_type") == "timeout"
        return {
            **base,
            "status": TIMED_OUT if timed_out else "failed",
            "option": None,
            "responded_by": None,
            "responded_at": iso(to_utc(decided_at)),
            "comment": None,
            "reason": str(event.get("error") or "no answer"),
        }
    chosen = list(event.get("chosen_options") or [])
    if len(chosen) != 1 or chosen[0] not in DECISIONS:
        raise ValueError(f"the approval answer must be exactly one of {OPTIONS}, got {chosen}")
    user = event.get("responded_by_user") or {}
    responded_at = event.get("responded_at") or decided_at
    comment = (event.get("params_input") or {}).get(COMMENT)
    return {
        **base,
        "status": DECISIONS[chosen[0]],
        "option": chosen[0],
        "responded_by": {"id": user.get("id"), "name": user.get("name")} if user else None,
        "responded_at": iso(to_utc(responded_at)),
        "comment": str(comment) if comment not in (None, "") else None,
    }


def only_upgrades(decision: Mapping[str, Any]) -> bool:
    return decision.get("status") == DECISIONS[UPGRADES_ONLY]


def refusal_message(decision: Mapping[str, Any]) -> str | None:
    """The failure message of an aborted / timed-out / failed request; None when approved."""
    status = decision.get("status")
    if status in (DECISIONS[APPLY_ALL], DECISIONS[UPGRADES_ONLY]):
        return None
    if status == TIMED_OUT:
        what = f"was not answered by its deadline {decision.get('deadline') or ''}".rstrip()
    elif status == "aborted":
        who = (decision.get("responded_by") or {}).get("name") or "an unknown user"
        comment = decision.get("comment")
        what = f"was aborted by {who} at {decision.get('responded_at')}" + (f" ({comment})" if comment else "")
    else:
        what = f"could not be answered: {decision.get('reason')}"
    return f"The mass-change approval {what}. Nothing was written to Lightspeed; see tier_sync_log.json."


# -- the operator ------------------------------------------------------------------------------


def comment_param() -> Param:
    """The request form's one field: optional (a required field would block the option buttons)."""
    return Param(
        None,
        type=["null", "string"],
        title="Reason / comment",
        description="Why you apply or abort; written into the sync log with your decision.",
        source="task",
    )


class SyncApprovalOperator(HITLOperator):  # type: ignore[misc]
    """approve_sync: asks only when plan.json awaits a decision; otherwise passes plan_sync's refs on.

    The subject, body, assigned users and deadline are set at run time from the plan and the
    Variables (the DAG file reads no Variable at parse time). Its return value is the list of batch
    refs `sync_batch` maps over.
    """

    def __init__(self, **kwargs: Any) -> None:
        # The DAG's params arrive merged in (source "dag"; HITLOperator keeps only the task's own).
        params = ParamsDict(dict(kwargs.pop("params", None) or {}))
        params[COMMENT] = comment_param()
        super().__init__(
            subject="Approve the tier sync",
            options=list(OPTIONS),
            defaults=None,  # no answer is a timeout (nothing written), never a default option
            multiple=False,
            params=params,
            response_timeout=timedelta(hours=settings.APPROVAL_TIMEOUT_HOURS),
            **kwargs,
        )

    def execute(self, context: Any) -> Any:
        from include.tier_sync.tasks import approval_request

        request = approval_request(context)
        if request.get("refs") is not None:
            return request["refs"]
        self.subject = request["subject"]
        self.body = request["body"]
        self.assigned_users = [{"id": u, "name": u} for u in request["approvers"]] or None
        self.response_timeout = request["timeout"]
        # The form asks for the comment only: in a worker the task's params hold the DAG's trigger
        # params again, which the form would show as required fields (blocking every option).
        self.params = ParamsDict({COMMENT: comment_param()})
        return super().execute(context)  # records the request, then parks the task (awaiting input)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from include.tier_sync.tasks import approval_answered

        if "error" not in event:
            self.validate_chosen_options(list(event.get("chosen_options") or []))
        return approval_answered(context, event)
