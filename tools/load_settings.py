"""Load airflow_settings.yaml (Astro CLI format) into a plain Airflow install.

Astro's `astro dev start` does this for Astro projects; elsewhere this uses Airflow's own import
commands (`airflow pools|variables|connections import`), so what is loaded is exactly what the UI
would show. Connections whose password is still a `<placeholder>` are skipped with a note when
asked, so a real token set in the UI is never overwritten by the placeholder.

    python -m tools.load_settings [airflow_settings.yaml] [--skip-placeholder-connections]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("<") and value.endswith(">")


def convert(settings: dict[str, Any], *, skip_placeholders: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Astro settings -> the JSON shapes of `airflow pools|variables|connections import`."""
    section = settings.get("airflow") or {}
    pools = {
        p["pool_name"]: {
            "slots": int(p.get("pool_slot", 1)),
            "description": p.get("pool_description") or "",
            "include_deferred": False,
        }
        for p in section.get("pools") or []
    }
    variables = {
        v["variable_name"]: "" if v.get("variable_value") is None else str(v["variable_value"])
        for v in section.get("variables") or []
    }
    connections: dict[str, Any] = {}
    for c in section.get("connections") or []:
        if skip_placeholders and _is_placeholder(c.get("conn_password")):
            print(f"skipping connection {c['conn_id']!r}: its password is a placeholder", file=sys.stderr)
            continue
        conn: dict[str, Any] = {"conn_type": c.get("conn_type") or "generic"}
        for key in ("host", "schema", "login", "password", "port"):
            value = c.get(f"conn_{key}")
            if value not in (None, ""):
                conn[key] = value
        extra = c.get("conn_extra")
        if extra:
            conn["extra"] = json.dumps(extra) if isinstance(extra, dict) else str(extra)
        connections[c["conn_id"]] = conn
    return pools, variables, connections


def _airflow(*args: str) -> None:
    airflow = Path(sys.executable).with_name("airflow")
    cmd = [str(airflow) if airflow.exists() else "airflow", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("settings", nargs="?", default="airflow_settings.yaml")
    parser.add_argument("--skip-placeholder-connections", action="store_true")
    args = parser.parse_args(argv)

    settings = yaml.safe_load(Path(args.settings).read_text()) or {}
    pools, variables, connections = convert(settings, skip_placeholders=args.skip_placeholder_connections)
    with tempfile.TemporaryDirectory() as tmp:
        # Variables set through AIRFLOW_VAR_* win over the DB anyway; only write the others.
        variables = {k: v for k, v in variables.items() if f"AIRFLOW_VAR_{k.upper()}" not in os.environ}
        for name, payload, cmd in (
            ("pools", pools, ["pools", "import"]),
            ("variables", variables, ["variables", "import", "--action-on-existing-key", "overwrite"]),
            ("connections", connections, ["connections", "import", "--overwrite"]),
        ):
            if not payload:
                continue
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(payload))
            _airflow(*cmd, str(path))
            print(f"loaded {len(payload)} {name}: {', '.join(sorted(payload))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
