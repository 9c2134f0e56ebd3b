"""Alerts: the channels (`send_alert`), redaction, run links and validation summaries.

What is sent when (one alert per run, "recovered", the deadline) is `run_alerts.py`.

Channels are Airflow connections, so a deployment configures them like any other secret:

- SMTP, connection `tier_sync_smtp` (type smtp, via providers-smtp): host, port, login/password;
  extras `from_email`, `to` (recipients; else the Variable `tier_sync_alert_emails`),
  `disable_tls` / `disable_ssl` for a plain server, `timeout`, `retry_limit`.
- Slack incoming webhook, connection `tier_sync_slack`: host + password form the webhook URL
  (or either one holds the whole URL).

With neither configured the alert is logged as a WARNING that says how to configure one. An alert
must never fail (or retry) the task it reports on, so every channel error is logged, not raised.
The text carries ids, counts and links only: never tokens or email addresses.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

SMTP_CONN_ID = "tier_sync_smtp"
SLACK_CONN_ID = "tier_sync_slack"
VAR_ALERT_EMAILS = "tier_sync_alert_emails"
VALIDATE_TASK_ID = "validate_tiers"
DEFAULT_BASE_URL = "http://localhost:8080"
SUBJECT_PREFIX = "[customer-tier-sync]"
DEFAULT_FROM = "customer-tier-sync@localhost"
MAX_EXCEPTION_CHARS = 3000

_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_SECRET_RE = re.compile(r"(?i)(bearer\s+|token[=:]\s*|password[=:]\s*|authorization[=:]\s*)\S+")


def redact(text: str) -> str:
    """Strip email addresses and token-looking values from free text (exception messages)."""
    text = _EMAIL_RE.sub("<email>", text)
    return _SECRET_RE.sub(lambda m: f"{m.group(1)}***", text)


# --------------------------------------------------------------------------------------------
# Context helpers: the task context and what a callback receives differ in shape.


def _ids(context: Mapping[str, Any]) -> dict[str, Any]:
    dag_run = context.get("dag_run")
    ti = context.get("ti") or context.get("task_instance")
    dag = context.get("dag")
    task = context.get("task")
    return {
        "dag_id": getattr(dag, "dag_id", None)
        or getattr(ti, "dag_id", None)
        or getattr(dag_run, "dag_id", None),
        "run_id": context.get("run_id") or getattr(dag_run, "run_id", None) or getattr(ti, "run_id", None),
        "task_id": getattr(ti, "task_id", None) or getattr(task, "task_id", None),
        "map_index": getattr(ti, "map_index", None),
        "try_number": getattr(ti, "try_number", None),
    }


def base_url() -> str:
    """The UI's base URL from `[api] base_url` (unset: localhost:8080)."""
    try:
        from airflow.configuration import conf

        value = conf.get("api", "base_url", fallback=DEFAULT_BASE_URL)
    except Exception:  # config unavailable (bare unit test)
        value = DEFAULT_BASE_URL
    return (value or DEFAULT_BASE_URL).rstrip("/")


def run_url(dag_id: str | None, run_id: str | None, task_id: str | None = None) -> str | None:
    """`<base>/dags/<dag_id>/runs/<run_id>[/tasks/<task_id>]`, the Airflow 3 UI route."""
    if not dag_id or not run_id:
        return None
    url = f"{base_url()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    return f"{url}/tasks/{quote(task_id, safe='')}" if task_id else url


def _find_summary(exc: BaseException | None) -> dict[str, Any] | None:
    """A DataQualityError's summary, also when the DAG re-raised it as AirflowFailException."""
    seen = 0
    while exc is not None and seen < 5:
        summary = getattr(exc, "summary", None)
        if isinstance(summary, Mapping):
            return dict(summary)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def validation_summary(context: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's validation summary: from the exception, else the run's validation.json."""
    exc = context.get("exception")
    found = _find_summary(exc if isinstance(exc, BaseException) else None)
    if found is not None:
        return found
    try:
        from include.tier_sync import fileio
        from include.tier_sync.ledger import RunPaths
        from include.tier_sync.runtime import resolve_as_of
        from include.tier_sync.settings import data_dir

        paths = RunPaths(data_dir(), resolve_as_of(context))
        report = fileio.read_json(paths.run_validation_json, default=None)
    except Exception as err:  # no data dir / unreadable: the alert goes out without details
        log.warning("could not read the run's validation report for the alert: %s", type(err).__name__)
        return None
    if isinstance(report, Mapping) and isinstance(report.get("summary"), Mapping):
        return dict(report["summary"])
    return None


def validation_lines(summary: Mapping[str, Any]) -> list[str]:
    """Failed expectations with counts and example customer ids, then the (non-blocking) warnings."""
    from include.tier_sync.validation import format_details

    failed = list(summary.get("failed_details") or [])
    lines = [
        f"Validation: {'passed' if summary.get('success') else 'FAILED'}, {len(failed)} of "
        f"{summary.get('evaluated', 0)} expectations failed on {summary.get('row_count', 0)} rows "
        f"(previous validated run {summary.get('previous_run') or 'none'}: "
        f"{summary.get('previous_row_count')} rows)",
    ]
    if failed:
        lines.append("Failed expectations:")
        lines.extend(format_details(failed))
    if summary.get("warnings"):
        lines.append("Warnings (not blocking):")
        lines.extend(format_details(summary["warnings"]))
    if summary.get("report"):
        lines.append(f"Report: {summary['report']}")
    if summary.get("data_docs"):
        lines.append(f"Data Docs: {summary['data_docs']}")
    return lines


# --------------------------------------------------------------------------------------------
# Channels


def _get_connection(conn_id: str) -> Any | None:
    """The connection, or None when it is not defined (any other lookup error is logged)."""
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    except Exception as err:
        if type(err).__name__ != "AirflowNotFoundException":
            log.warning("alert connection %r could not be read: %s", conn_id, type(err).__name__)
        return None


def _split_addresses(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return _split_addresses(json.loads(text))
            except json.JSONDecodeError:
                pass
        return [a.strip() for a in re.split(r"[,;\s]+", text) if a.strip()]
    if isinstance(value, Sequence):
        return [str(a).strip() for a in value if str(a).strip()]
    return []


def _alert_emails_variable() -> str | None:
    from include.tier_sync.settings import variable

    return variable(VAR_ALERT_EMAILS)


def _send_smtp(conn: Any, conn_id: str, subject: str, text: str) -> str:
    extra = conn.extra_dejson or {}
    to = _split_addresses(extra.get("to")) or _split_addresses(_alert_emails_variable())
    if not to:
        log.warning(
            "alert: SMTP connection %r has no recipients; set its extra 'to' or the Variable %r",
            conn_id,
            VAR_ALERT_EMAILS,
        )
        return "no recipients"
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    body = f'<pre style="font-family: monospace">{html.escape(text)}</pre>'
    with SmtpHook(smtp_conn_id=conn_id) as hook:
        hook.send_email_smtp(
            to=to,
            subject=subject,
            html_content=body,
            from_email=extra.get("from_email") or DEFAULT_FROM,
        )
    log.info("alert sent by email through connection %r to %d recipient(s)", conn_id, len(to))
    return "sent"


def slack_webhook_url(conn: Any) -> str | None:
    """Webhook URL from the connection: host + '/' + password, or whichever holds a full URL."""
    host = (conn.host or "").strip()
    password = (conn.password or "").strip()
    extra = conn.extra_dejson or {}
    if password.startswith(("http://", "https://")):
        return password
    if extra.get("webhook_url"):
        return str(extra["webhook_url"])
    if not host:
        return None
    if "://" not in host:
        scheme = conn.schema or "https"
        port = f":{conn.port}" if conn.port else ""
        host = f"{scheme}://{host}{port}"
    return f"{host.rstrip('/')}/{password.lstrip('/')}" if password else host


def _send_slack(conn: Any, conn_id: str, subject: str, text: str) -> str:
    import requests

    url = slack_webhook_url(conn)
    if not url:
        log.warning("alert: Slack connection %r has no webhook URL (set host + password)", conn_id)
        return "no webhook url"
    timeout = float((conn.extra_dejson or {}).get("timeout", 10))
    resp = requests.post(url, json={"text": f"*{subject}*\n```\n{text}\n```"}, timeout=timeout)
    if resp.status_code >= 300:
        # Never log the URL or the response body: the URL is the secret.
        raise RuntimeError(f"Slack webhook answered HTTP {resp.status_code}")
    log.info("alert posted to the Slack webhook of connection %r", conn_id)
    return "sent"


def send_alert(
    subject: str,
    text: str,
    context: Mapping[str, Any] | None = None,
    *,
    smtp_conn_id: str = SMTP_CONN_ID,
    slack_conn_id: str = SLACK_CONN_ID,
) -> dict[str, str]:
    """Send an alert on every configured channel; never raises. Returns {channel: outcome}.

    For the sync's own stops (circuit breaker, group-count mismatch): pass the task context to
    append the run link to the text.
    """
    if not subject.startswith(SUBJECT_PREFIX):
        subject = f"{SUBJECT_PREFIX} {subject}"
    if context is not None:
        ids = _ids(context)
        link = run_url(ids["dag_id"], ids["run_id"])
        if link and link not in text:
            text = f"{text}\n\nRun in the Airflow UI: {link}"
    outcome: dict[str, str] = {}
    channels = (("smtp", smtp_conn_id, _send_smtp), ("slack", slack_conn_id, _send_slack))
    for name, conn_id, sender in channels:
        conn = _get_connection(conn_id)
        if conn is None:
            outcome[name] = "not configured"
            continue
        try:
            outcome[name] = sender(conn, conn_id, subject, text)
        except Exception as err:  # a broken channel must not fail the task it reports on
            outcome[name] = "failed"
            log.error("alert via %s (connection %r) failed: %s", name, conn_id, redact(_describe(err)))
    if all(v == "not configured" for v in outcome.values()):
        log.warning(
            "No alert channel is configured for customer-tier-sync, so this alert is only logged. "
            "To get alerts, create an SMTP connection %r (host, port, login/password; extras "
            "from_email, to) or a Slack incoming-webhook connection %r (host + password = webhook "
            "URL).\n%s\n%s",
            smtp_conn_id,
            slack_conn_id,
            subject,
            text,
        )
    return outcome


def _describe(err: BaseException) -> str:
    """Exception type and message, minus anything URL-like (a webhook URL is a secret)."""
    return re.sub(r"https?://\S+", "<url>", f"{type(err).__name__}: {err}")
