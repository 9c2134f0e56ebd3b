"""commit_master against real git: a local bare remote, races, a refusing remote, token hygiene.

The token path is tested end to end over HTTP: a small in-process server runs `git http-backend`
behind Basic auth, so the credential helper really has to hand git the token.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from include.tier_sync import fileio, git_remote, ledger
from include.tier_sync.git_export import GitPushError, build_commit_message, commit_master
from include.tier_sync.git_remote import GitExportError, parse_remote, scrub
from include.tier_sync.ledger import RunPaths
from include.tier_sync.runtime import iso
from tests.servers import git_http_server

pytestmark = pytest.mark.unit

REAL_GIT = shutil.which("git") or "git"
DAY1 = datetime(2026, 11, 24, 2, tzinfo=UTC)
DAY2 = datetime(2026, 11, 25, 2, tzinfo=UTC)
DAY3 = datetime(2026, 11, 26, 2, tzinfo=UTC)
HEADER = "Customer ID,Tier,Previous Tier\n"
TOKEN = "ghp_SuperSecretToken_0123456789abcdef"
# The local http git server fixture is plain http: a token goes there only with this opt-in.
INSECURE_HTTP_OK = {"allow_insecure_http": True}


@pytest.fixture(autouse=True)
def _isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user/system git config (hooks, signing, credential helpers) and no real connection."""
    cfg = tmp_path / "gitconfig"
    cfg.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_CONFIG_COUNT", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_GIT_DEFAULT", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_TIER_SYNC_GIT_REMOTE", raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(tmp_path / "data"))


def git(cwd: Path | str, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@x"
    return subprocess.run(
        [REAL_GIT, *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout


def make_run(data: Path, as_of: datetime, rows: list[str], history: str | None = None) -> RunPaths:
    paths = RunPaths(str(data), as_of)
    run_dir = Path(paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "customer_analytics_master.csv").write_text(HEADER + "".join(r + "\n" for r in rows))
    if history is not None:
        Path(paths.tier_history).write_text(history)
    # What publish_run records before commit_csv runs: the ledger is how git knows the newest day.
    with ledger.publishing(paths):
        ledger.record_published(paths, identity(as_of), {})
        if ledger.is_newest_run(paths):
            fileio.write_json(paths.latest_json, {"as_of": iso(as_of)})
    return paths


def identity(as_of: datetime, run_id: str | None = None) -> dict[str, Any]:
    return {
        "dag_id": "customer_tier_sync",
        "run_id": run_id or f"scheduled__{iso(as_of)}",
        "as_of": iso(as_of),
        "logical_date": iso(as_of),
    }


def remote_log(remote: Path, branch: str = "main") -> list[str]:
    return git(remote, "log", "--format=%s", branch).splitlines()


SUMMARY = {"changes": 3, "moves": {"Bloom -> Evergreen": 2, "Seed -> Sprout": 1}}


def default_remote(data: Path) -> Path:
    return data / "git" / "tiers.git"


def test_first_run_creates_bare_remote_and_commits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    paths = make_run(data, DAY1, ["c1,Bloom,Seed"], history="as_of,run_id,tier,count\n")
    remote = default_remote(data)

    out = commit_master(paths, identity(DAY1), SUMMARY, remote=str(remote), branch="main")

    assert out["changed"] and out["pushed"] and out["commit"]
    assert out["remote"] == str(remote)
    assert git(remote, "rev-parse", "--is-bare-repository").strip() == "true"
    assert git(remote, "rev-parse", "main").strip() == out["commit"]
    assert git(remote, "show", "main:customer_analytics_master.csv") == HEADER + "c1,Bloom,Seed\n"
    assert git(remote, "show", "main:tier_history.csv").startswith("as_of,run_id")
    assert git(remote, "log", "-1", "--format=%an <%ae>", "main").strip() == (
        "customer-tier-sync <tier-sync@localhost>"
    )
    assert (data / "git" / "work" / ".git").is_dir()


def test_identical_content_makes_no_commit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = str(default_remote(data))
    commit_master(
        make_run(data, DAY1, ["c1,Bloom,Seed"]), identity(DAY1), SUMMARY, remote=remote, branch="main"
    )

    out = commit_master(
        make_run(data, DAY2, ["c1,Bloom,Seed"]), identity(DAY2), {"changes": 0}, remote=remote, branch="main"
    )

    assert out == {**out, "changed": False, "pushed": False, "commit": None}
    assert len(remote_log(Path(remote))) == 1


def test_rerun_of_same_run_makes_no_duplicate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = Path(default_remote(data))
    paths = make_run(data, DAY1, ["c1,Bloom,Seed"])
    first = commit_master(paths, identity(DAY1), SUMMARY, remote=str(remote), branch="main")

    again = commit_master(paths, identity(DAY1), SUMMARY, remote=str(remote), branch="main")
    assert again["changed"] is False and again["commit"] == first["commit"]

    # Someone edits the CSV in the repository; a rerun of the same run must not revert it with a
    # second commit for that run: the trailer finds the run's commit with identical files.
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(remote), str(other))
    (other / "customer_analytics_master.csv").write_text(HEADER + "c1,Evergreen,Seed\n")
    git(other, "commit", "-qam", "manual fix")
    git(other, "push", "-q", "origin", "main")

    third = commit_master(paths, identity(DAY1), SUMMARY, remote=str(remote), branch="main")
    assert third["changed"] is False and third["commit"] == first["commit"]
    assert remote_log(remote) == ["manual fix", remote_log(remote)[1]]
    assert (
        len(git(remote, "log", "--format=%H", "--grep=Tier-Sync-Run: 20261124T020000Z", "main").split()) == 1
    )


def test_changed_csv_makes_one_commit_naming_run_and_moves(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    commit_master(
        make_run(data, DAY1, ["c1,Bloom,Seed"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )

    out = commit_master(
        make_run(data, DAY2, ["c1,Evergreen,Bloom"]),
        identity(DAY2, "scheduled__day2"),
        {"changes": 1, "moves": {("Bloom", "Evergreen"): 1}},
        remote=str(remote),
        branch="main",
    )

    assert out["changed"] and out["pushed"]
    message = git(remote, "log", "-1", "--format=%B", "main")
    assert message.splitlines()[0] == "Tier sync 2026-11-25T02:00:00Z: 1 tier change (run scheduled__day2)"
    assert "Bloom -> Evergreen: 1" in message
    assert "Tier-Sync-Run: 20261125T020000Z" in message
    assert len(remote_log(remote)) == 2


def test_backfill_does_not_regress_newer_master(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    commit_master(
        make_run(data, DAY2, ["c1,Evergreen,Bloom"]),
        identity(DAY2),
        SUMMARY,
        remote=str(remote),
        branch="main",
    )

    out = commit_master(
        make_run(data, DAY1, ["c1,Bloom,Seed"], history="as_of\nday1\nday2\n"),
        identity(DAY1),
        SUMMARY,
        remote=str(remote),
        branch="main",
    )

    assert out["changed"]
    assert git(remote, "show", "main:customer_analytics_master.csv") == HEADER + "c1,Evergreen,Bloom\n"
    assert git(remote, "show", "main:tier_history.csv") == "as_of\nday1\nday2\n"
    assert "newer run" in git(remote, "log", "-1", "--format=%B", "main")


def test_a_future_trailer_pushed_by_anyone_does_not_stop_the_next_commit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    commit_master(make_run(data, DAY1, ["c1,Bloom,Seed"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main")
    # Someone pushes a master whose trailer claims a day far in the future.
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(remote), str(clone))
    (clone / "customer_analytics_master.csv").write_text(HEADER + "c1,Seed,None\n")
    git(clone, "commit", "-qam", "hand edit\n\nTier-Sync-Run: 20991231T020000Z\nTier-Sync-As-Of: 2099-12-31T02:00:00Z")
    git(clone, "push", "-q", "origin", "main")

    out = commit_master(make_run(data, DAY2, ["c1,Evergreen,Bloom"]), identity(DAY2), SUMMARY, remote=str(remote), branch="main")

    assert out["changed"] and out["pushed"]
    assert git(remote, "show", "main:customer_analytics_master.csv") == HEADER + "c1,Evergreen,Bloom\n"
    assert "left as is" not in git(remote, "log", "-1", "--format=%B", "main")


def test_race_with_another_clone_rebases_and_pushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    commit_master(
        make_run(data, DAY1, ["c1,Bloom,Seed"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )

    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(remote), str(other))
    real_run = git_remote._Git.run
    raced: list[bool] = []

    def racing_run(self: git_remote._Git, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("push",) and not raced:
            raced.append(True)  # another clone pushes between our fetch and our push
            (other / "README.md").write_text("tiers\n")
            (other / "customer_analytics_master.csv").write_text(HEADER + "c1,Seed,Seed\n")
            git(other, "add", "-A")
            git(other, "commit", "-qm", "other clone")
            git(other, "push", "-q", "origin", "main")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(git_remote._Git, "run", racing_run)
    out = commit_master(
        make_run(data, DAY2, ["c1,Evergreen,Bloom"]),
        identity(DAY2, "day2"),
        SUMMARY,
        remote=str(remote),
        branch="main",
    )

    assert raced and out["pushed"] and out["changed"]
    assert "lost a race" in caplog.text
    log = remote_log(remote)
    assert log[1] == "other clone" and log[0].startswith("Tier sync 2026-11-25")
    assert git(remote, "show", "main:customer_analytics_master.csv") == HEADER + "c1,Evergreen,Bloom\n"
    assert git(remote, "show", "main:README.md") == "tiers\n"


def test_refusing_remote_keeps_commit_and_next_run_pushes_both(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    commit_master(
        make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )
    hook = remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'pushes are frozen' >&2\nexit 1\n")
    hook.chmod(0o755)

    paths2 = make_run(data, DAY2, ["c1,Sprout,Seed"])
    with pytest.raises(GitPushError) as err:
        commit_master(paths2, identity(DAY2, "day2"), SUMMARY, remote=str(remote), branch="main")
    message = str(err.value)
    assert str(remote) in message and "pre-receive hook declined" in message and "next run" in message
    work = data / "git" / "work"
    assert git(work, "log", "-1", "--format=%s").startswith("Tier sync 2026-11-25")
    assert len(remote_log(remote)) == 1

    # The rerun of the failed run is refused as well, without a second local commit.
    with pytest.raises(GitPushError):
        commit_master(paths2, identity(DAY2, "day2"), SUMMARY, remote=str(remote), branch="main")
    assert len(git(work, "log", "--format=%H").split()) == 2

    hook.unlink()
    out = commit_master(
        make_run(data, DAY3, ["c1,Bloom,Sprout"]),
        identity(DAY3, "day3"),
        SUMMARY,
        remote=str(remote),
        branch="main",
    )
    assert out["pushed"] and out["changed"]
    log = remote_log(remote)
    assert (
        len(log) == 3
        and log[0].startswith("Tier sync 2026-11-26")
        and log[1].startswith("Tier sync 2026-11-25")
    )


def test_rerun_after_refusal_pushes_kept_commit_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    commit_master(
        make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )
    hook = remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    paths2 = make_run(data, DAY2, ["c1,Sprout,Seed"])
    with pytest.raises(GitPushError):
        commit_master(paths2, identity(DAY2), SUMMARY, remote=str(remote), branch="main")
    hook.unlink()

    out = commit_master(paths2, identity(DAY2), SUMMARY, remote=str(remote), branch="main")

    assert out["pushed"] and not out["changed"] and out["commit"]
    assert git(remote, "rev-parse", "main").strip() == out["commit"]
    assert len(remote_log(remote)) == 2


def test_push_race_that_never_settles_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    commit_master(
        make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(remote), str(other))
    real_run = git_remote._Git.run
    counter = iter(range(100))

    def always_racing(self: git_remote._Git, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("push",):
            (other / "noise.txt").write_text(str(next(counter)))
            git(other, "add", "noise.txt")
            git(other, "commit", "-qm", "noise")
            git(other, "push", "-q", "origin", "main")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(git_remote._Git, "run", always_racing)
    with pytest.raises(GitPushError, match="fetch first|non-fast-forward"):
        commit_master(
            make_run(data, DAY2, ["c1,Sprout,Seed"]),
            identity(DAY2),
            SUMMARY,
            remote=str(remote),
            branch="main",
            max_push_attempts=3,
        )


def test_missing_non_default_local_remote_is_an_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(GitExportError, match="does not exist"):
        commit_master(
            make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=str(tmp_path / "typo.git")
        )


def test_missing_run_master_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GitExportError, match="compute_tiers"):
        commit_master(RunPaths(str(tmp_path / "data"), DAY1), identity(DAY1), SUMMARY, branch="main")


@pytest.mark.parametrize(
    "url",
    [
        f"https://bot:{TOKEN}@example.invalid/tiers.git",
        f"https://{TOKEN}@example.invalid/tiers.git",
        f"http://x-access-token:{TOKEN}@127.0.0.1:9/tiers.git",
        f"ssh://git:{TOKEN}@example.invalid/tiers.git",
    ],
)
def test_credential_bearing_remote_is_refused(
    tmp_path: Path, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    paths = make_run(tmp_path / "data", DAY1, ["c1,Seed,None"])
    with pytest.raises(GitExportError, match="credentials|password") as err:
        commit_master(paths, identity(DAY1), SUMMARY, remote=url, branch="main")
    assert TOKEN not in str(err.value) and TOKEN not in caplog.text
    assert not (tmp_path / "data" / "git").exists()  # refused before git ran at all


def test_parse_remote_kinds(tmp_path: Path) -> None:
    assert parse_remote("https://example.invalid/r.git").kind == "http"
    assert parse_remote("git@github.com:org/r.git").kind == "ssh"
    assert parse_remote("ssh://git@example.invalid/r.git").kind == "ssh"
    assert parse_remote(f"file://{tmp_path}/r.git").kind == "local"
    assert parse_remote(str(tmp_path / "r.git")).kind == "local"
    with pytest.raises(GitExportError, match="not supported"):
        parse_remote("ftp://example.invalid/r.git")


def test_scrub_removes_secrets_and_userinfo() -> None:
    text = f"fatal: unable to access 'https://bot:{TOKEN}@h/r.git/': token {TOKEN}"
    assert TOKEN not in scrub(text, [TOKEN])
    assert "https://***@h/r.git" in scrub(text)


def test_commit_message_format() -> None:
    msg = build_commit_message(
        {"run_id": "manual__x"},
        "20261125T020000Z",
        "2026-11-25T02:00:00Z",
        {"moves": [{"from": "Bloom", "to": "Evergreen", "count": 3}, {"from": "Seed", "to": "Sprout"}]},
    )
    lines = msg.splitlines()
    assert lines[0] == "Tier sync 2026-11-25T02:00:00Z: 4 tier changes (run manual__x)"
    assert "Bloom -> Evergreen: 3" in lines and "Seed -> Sprout: 1" in lines
    assert lines[-3:] == [
        "Tier-Sync-Run: 20261125T020000Z",
        "Tier-Sync-As-Of: 2026-11-25T02:00:00Z",
        "Airflow-Run-Id: manual__x",
    ]


# --------------------------------------------------------------------------------------------
# Token over real HTTP


@pytest.fixture
def http_remote(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    root = tmp_path / "srv"
    bare = root / "tiers.git"
    bare.mkdir(parents=True)
    git(bare, "init", "-q", "--bare", "--initial-branch=main")
    with git_http_server(root, user="bot", token=TOKEN) as (base, auth_headers):
        yield f"{base}/tiers.git", bare, auth_headers


@pytest.fixture
def recording_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `git` first on PATH that records its argv and environment, then runs the real git."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "git-calls.log"
    wrapper = bindir / "git"
    wrapper.write_text(
        f'#!/bin/sh\n{{ echo "ARGV $*"; env | sed "s/^/ENV /"; }} >> "{record}"\nexec "{REAL_GIT}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_token_from_connection_reaches_git_only_through_env(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    http_remote: tuple[str, Path, list[str]],
    recording_git: Path,
) -> None:
    url, bare, auth_headers = http_remote
    # No remote argument: the connection's host is the remote when the Variable is not set.
    # The fixture server speaks plain http, so the connection opts in (test_git_hardening checks the refusal).
    conn = {"conn_type": "git", "host": url, "login": "bot", "password": TOKEN, "extra": INSECURE_HTTP_OK}
    monkeypatch.setenv("AIRFLOW_CONN_GIT_DEFAULT", json.dumps(conn))
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data"

    out = commit_master(make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, branch="main")
    out2 = commit_master(make_run(data, DAY2, ["c1,Sprout,Seed"]), identity(DAY2), SUMMARY, branch="main")

    assert out["pushed"] and out2["pushed"] and out["remote"] == url
    assert len(remote_log(bare)) == 2
    assert any(h.startswith("Basic ") for h in auth_headers)  # the server did demand the token
    work = data / "git" / "work"
    places = {
        "work log -p": git(work, "log", "-p", "--all"),
        "remote log -p": git(bare, "log", "-p", "--all"),
        "work config": (work / ".git" / "config").read_text(),
        "remote config": (bare / "config").read_text(),
        "caplog": caplog.text,
        "result": json.dumps([out, out2]),
    }
    for name, text in places.items():
        assert TOKEN not in text, name
    assert not list(data.rglob(".git-credentials"))
    calls = recording_git.read_text().splitlines()
    argv = [line for line in calls if line.startswith("ARGV ")]
    assert any(" push " in f" {line} " for line in argv)
    assert all(TOKEN not in line for line in argv)
    token_env = {line.split("=", 1)[0] for line in calls if line.startswith("ENV ") and TOKEN in line}
    assert token_env == {f"ENV {git_remote.TOKEN_ENV}"}
    assert TOKEN not in os.environ.get(git_remote.TOKEN_ENV, "")  # the worker's env is untouched


def test_wrong_token_fails_without_leaking_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_remote: tuple[str, Path, list[str]]
) -> None:
    url, _bare, _headers = http_remote
    wrong = "ghp_WrongToken_fedcba9876543210"
    conn = {"conn_type": "git", "host": url, "login": "bot", "password": wrong, "extra": INSECURE_HTTP_OK}
    monkeypatch.setenv("AIRFLOW_CONN_GIT_DEFAULT", json.dumps(conn))

    with pytest.raises(GitExportError) as err:
        commit_master(
            make_run(tmp_path / "data", DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, branch="main"
        )

    assert "Authentication failed" in str(err.value) or "401" in str(err.value)
    assert wrong not in str(err.value)


def test_variable_remote_wins_over_connection_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    explicit = tmp_path / "explicit.git"
    git(tmp_path, "init", "-q", "--bare", "--initial-branch=main", str(explicit))
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_GIT_REMOTE", str(explicit))
    conn = {"conn_type": "git", "host": "https://example.invalid/never.git"}
    monkeypatch.setenv("AIRFLOW_CONN_GIT_DEFAULT", json.dumps(conn))

    out = commit_master(make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, branch="main")

    assert out["remote"] == str(explicit) and out["pushed"]
    assert len(remote_log(explicit)) == 1


def test_connection_host_is_the_remote_when_no_variable_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit task used to pass the Variable-or-default remote, so the connection's host was never used."""
    from include.tier_sync import tasks

    data = tmp_path / "data"
    from_conn = tmp_path / "from-connection.git"
    git(tmp_path, "init", "-q", "--bare", "--initial-branch=main", str(from_conn))
    monkeypatch.delenv("AIRFLOW_VAR_TIER_SYNC_GIT_REMOTE", raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_DATA_DIR", str(data))
    monkeypatch.setenv("AIRFLOW_CONN_GIT_DEFAULT", json.dumps({"conn_type": "git", "host": str(from_conn)}))
    paths = make_run(data, DAY1, ["c1,Seed,None"])
    context = {"data_interval_start": DAY1 - timedelta(days=1), "data_interval_end": DAY1, "run_id": "r1"}

    out = tasks.commit_task(context, {"changes": 0})

    assert out["remote"] == str(from_conn) and out["pushed"]
    assert len(remote_log(from_conn)) == 1
    assert not default_remote(Path(paths.data_dir)).exists()


def test_ssh_environment_from_connection_extras(tmp_path: Path) -> None:
    auth = git_remote.GitAuth.from_fields(
        None,
        "git",
        None,
        {
            "private_key": "-----BEGIN KEY-----\nabc\n-----END KEY-----",
            "private_key_passphrase": "passphrase-1234",
            "known_hosts_file": "/etc/kh",
            "strict_host_key_checking": "accept-new",
            "ssh_port": "2222",
            "author_name": "Tier Bot",
        },
    )
    remote = parse_remote("git@example.invalid:org/tiers.git")
    with git_remote.git_environment(remote, auth) as env:
        command = env["GIT_SSH_COMMAND"]
        key_path = command.split("-i ", 1)[1].split()[0]
        assert oct(os.stat(key_path).st_mode & 0o777) == "0o600"
        assert "StrictHostKeyChecking=accept-new" in command and "-p 2222" in command
        assert "UserKnownHostsFile=/etc/kh" in command
        assert env[git_remote.PASSPHRASE_ENV] == "passphrase-1234"
        assert "passphrase-1234" not in Path(env["SSH_ASKPASS"]).read_text()
        assert env["GIT_AUTHOR_NAME"] == "Tier Bot" and git_remote.TOKEN_ENV not in env
    assert not os.path.exists(key_path)  # the key file lives only as long as the export
    assert "passphrase" not in repr(auth)


# -- tier_sync_git_without_contacts ----------------------------------------------------------------

CONTACT_HEADER = "\ufeffCustomer ID,Customer Code,Name,Email,Phone,Lifetime Value,Tier\n"
CONTACT_ROWS = [
    'c1,K-1,"Zoë, Smith",zoe@example.com,\'+64 21 555 9991,12.50,Seed',
    "c2,'=K2,'=HYPERLINK(1),bo@example.com,,-3.00,None",
]


def make_contact_run(data: Path, as_of: datetime) -> RunPaths:
    paths = make_run(data, as_of, [])
    Path(paths.run_master_csv).write_text(CONTACT_HEADER + "".join(r + "\n" for r in CONTACT_ROWS), encoding="utf-8")
    return paths


def test_the_git_master_can_leave_out_contact_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from include.tier_sync.tasks import commit_task

    data = tmp_path / "data"
    paths = make_contact_run(data, DAY1)
    remote = default_remote(data)
    context = {"data_interval_start": DAY1 - timedelta(days=1), "data_interval_end": DAY1, "run_id": "r1"}
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_GIT_WITHOUT_CONTACTS", "true")

    out = commit_task(context, SUMMARY)

    assert out["changed"] and out["pushed"]
    committed = git(remote, "show", "main:customer_analytics_master.csv")
    assert committed == (
        "\ufeffCustomer ID,Customer Code,Lifetime Value,Tier\nc1,K-1,12.50,Seed\nc2,'=K2,-3.00,None\n"
    )
    assert "zoe@example.com" not in git(remote, "log", "-p", "main")
    # The data dir keeps the full master.
    assert "zoe@example.com" in Path(paths.run_master_csv).read_text(encoding="utf-8")
    # A rerun with the same setting commits nothing new.
    assert commit_task(context, SUMMARY)["changed"] is False
    # Turned off, the next commit holds the contact columns again, byte for byte.
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_GIT_WITHOUT_CONTACTS", "false")
    assert commit_task(context, SUMMARY)["changed"] is True
    assert git(remote, "show", "main:customer_analytics_master.csv").encode() == Path(paths.run_master_csv).read_bytes()


def test_a_bad_without_contacts_value_fails_the_commit_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from include.tier_sync.tasks import commit_task

    make_contact_run(tmp_path / "data", DAY1)
    monkeypatch.setenv("AIRFLOW_VAR_TIER_SYNC_GIT_WITHOUT_CONTACTS", "yes please")
    context = {"data_interval_start": DAY1 - timedelta(days=1), "data_interval_end": DAY1}
    with pytest.raises(AirflowFailException, match="tier_sync_git_without_contacts must be true or false"):
        commit_task(context, SUMMARY)
    assert not default_remote(tmp_path / "data").exists()  # nothing was committed
