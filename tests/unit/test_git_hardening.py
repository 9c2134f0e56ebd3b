"""The git export's hardening: pinned transports, no token over plain http, SSH host keys checked,
and a damaged working copy repaired only when no unpushed commit can be lost.

Reuses the real-git helpers and fixtures of test_git_export (isolated git config, the local http
git server, the recording `git` wrapper).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import airflow.sdk  # noqa: F401  (see below)
import pytest

from include.tier_sync import git_remote
from include.tier_sync.git_export import GitPushError, commit_master
from include.tier_sync.git_remote import GitAuth, GitExportError, _Git, git_environment, parse_remote
from tests.unit.test_git_export import (
    DAY1,
    DAY2,
    DAY3,
    SUMMARY,
    TOKEN,
    _isolated_git,
    default_remote,
    git,
    http_remote,
    identity,
    make_run,
    recording_git,
    remote_log,
)

pytestmark = pytest.mark.unit
# Airflow sets up logging when first imported and replaces the root handlers, caplog's among them:
# imported above, before any test, so the first test that reads its log lines sees them.
# The fixtures shared with test_git_export: pytest finds them by name in this module.
_SHARED_FIXTURES = (_isolated_git, http_remote, recording_git)

ALLOWLIST = "file:http:https:ssh"


def _fake_program(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


# --------------------------------------------------------------------------------------------
# Transports


@pytest.mark.parametrize(
    "remote",
    [
        "ext::sh -c touch% {marker}",
        "fd::17",
        "fd::3,4/tiers",
        "evil::https://example.invalid/tiers.git",
        "testgit::{marker}",
    ],
)
def test_transport_helper_remotes_are_refused_before_git_runs(tmp_path: Path, remote: str) -> None:
    marker = tmp_path / "ran"
    remote = remote.format(marker=marker)
    paths = make_run(tmp_path / "data", DAY1, ["c1,Seed,None"])

    with pytest.raises(GitExportError, match="transport .* not supported"):
        parse_remote(remote)
    with pytest.raises(GitExportError, match="not supported"):
        commit_master(paths, identity(DAY1), SUMMARY, remote=remote, branch="main")

    assert not (tmp_path / "data" / "git").exists() and not marker.exists()
    # An address that merely contains "::" is not a transport helper.
    assert parse_remote("ssh://git@[::1]:2222/tiers.git").kind == "ssh"


def test_git_itself_refuses_transports_outside_the_allowlist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a remote that bypassed parse_remote (a submodule, a redirect, a config) is refused by git,
    and a user-wide `protocol.allow=always` cannot re-enable it."""
    marker = tmp_path / "helper-ran"
    bindir = tmp_path / "bin"
    _fake_program(bindir, "git-remote-evil", f'touch "{marker}"\nexit 1')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "gitconfig").write_text("[protocol]\n\tallow = always\n")

    with git_environment(parse_remote(str(tmp_path / "r.git")), None) as env:
        assert env["GIT_ALLOW_PROTOCOL"] == ALLOWLIST
        proc = _Git(str(tmp_path), env, ()).run("ls-remote", "evil::anything", check=False)

    assert proc.returncode != 0 and "transport 'evil' not allowed" in proc.stderr
    assert not marker.exists()


def test_every_git_call_runs_with_the_protocol_allowlist(tmp_path: Path, recording_git: Path) -> None:
    data = tmp_path / "data"
    remote = str(default_remote(data))
    commit_master(
        make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=remote, branch="main"
    )
    commit_master(
        make_run(data, DAY2, ["c1,Sprout,Seed"]), identity(DAY2), SUMMARY, remote=remote, branch="main"
    )

    calls: list[list[str]] = []
    for line in recording_git.read_text().splitlines():
        if line.startswith("ARGV "):
            calls.append([line])
        elif calls:
            calls[-1].append(line)
    assert len(calls) > 10 and any(call[0].startswith("ARGV push") for call in calls)
    for call in calls:
        assert f"ENV GIT_ALLOW_PROTOCOL={ALLOWLIST}" in call, call[0]
    assert len(remote_log(Path(remote))) == 2


# --------------------------------------------------------------------------------------------
# A token over plain http


def test_token_over_plain_http_is_refused_without_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_remote: tuple[str, Path, list[str]]
) -> None:
    url, bare, auth_headers = http_remote
    conn = {"conn_type": "git", "host": url, "login": "bot", "password": TOKEN}
    monkeypatch.setenv("AIRFLOW_CONN_GIT_DEFAULT", json.dumps(conn))
    data = tmp_path / "data"

    with pytest.raises(GitExportError, match="plain http") as err:
        commit_master(make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, branch="main")

    message = str(err.value)
    assert "allow_insecure_http" in message and "https://" in message and "git_default" in message
    assert TOKEN not in message
    assert not any(auth_headers)  # the server never saw the token (nor any request)
    assert git(bare, "for-each-ref") == ""
    assert not (data / "git").exists()


def test_allow_insecure_http_is_a_strict_boolean(tmp_path: Path) -> None:
    remote = parse_remote("http://127.0.0.1:9/tiers.git")
    for value in (True, "true", "yes", "1"):
        auth = GitAuth.from_fields(None, "bot", TOKEN, {"allow_insecure_http": value})
        git_remote.check_transport(remote, auth)  # opted in: allowed
    for value in (False, "false", None):
        auth = GitAuth.from_fields(None, "bot", TOKEN, {"allow_insecure_http": value})
        with pytest.raises(GitExportError, match="plain http"):
            git_remote.check_transport(remote, auth)
    with pytest.raises(GitExportError, match="allow_insecure_http is 'maybe'"):
        GitAuth.from_fields(None, "bot", TOKEN, {"allow_insecure_http": "maybe"})
    # https, or no token at all, needs no opt-in.
    plain = GitAuth.from_fields(None, "bot", TOKEN, {})
    git_remote.check_transport(parse_remote("https://example.invalid/tiers.git"), plain)
    git_remote.check_transport(remote, GitAuth.from_fields(None, None, None, {}))


# --------------------------------------------------------------------------------------------
# A damaged working copy


def _loose_object(dot_git: Path, rev: str) -> Path:
    sha = git(dot_git.parent, "rev-parse", rev).strip()
    path = dot_git / "objects" / sha[:2] / sha[2:]
    assert path.is_file(), f"{rev} is not a loose object"
    return path


def _rm_head(dot_git: Path) -> None:
    (dot_git / "HEAD").unlink()


def _garble_head(dot_git: Path) -> None:
    (dot_git / "HEAD").write_bytes(b"\x00\x13garbage\n")


def _rm_tip_commit(dot_git: Path) -> None:
    _loose_object(dot_git, "HEAD").unlink()


def _rm_objects(dot_git: Path) -> None:
    shutil.rmtree(dot_git / "objects")


def _corrupt_blob(dot_git: Path) -> None:
    path = _loose_object(dot_git, "HEAD:customer_analytics_master.csv")
    path.chmod(0o644)
    path.write_bytes(b"not zlib at all")


DAMAGES: dict[str, Callable[[Path], None]] = {
    "HEAD missing": _rm_head,
    "HEAD garbage": _garble_head,
    "tip commit object missing": _rm_tip_commit,
    "objects folder gone": _rm_objects,
    "blob corrupt": _corrupt_blob,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_work_copy_with_nothing_unpushed_is_set_aside(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    work = data / "git" / "work"
    commit_master(
        make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )
    DAMAGES[damage](work / ".git")

    out = commit_master(
        make_run(data, DAY2, ["c1,Sprout,Seed"]), identity(DAY2), SUMMARY, remote=str(remote), branch="main"
    )

    assert out["changed"] and out["pushed"]
    assert len(remote_log(remote)) == 2
    assert git(remote, "show", "main:customer_analytics_master.csv").endswith("c1,Sprout,Seed\n")
    aside = list((data / "git").glob("work.damaged-*"))
    assert len(aside) == 1 and (aside[0] / ".git").is_dir()  # kept for inspection, never deleted
    assert not list((data / "git").glob("work.repair*"))
    git(work, "fsck", "--no-progress")  # the new working copy is sound
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("set aside" in m and str(aside[0]) in m for m in warnings)


def _unpushed_commit(data: Path, remote: Path) -> str:
    """DAY1 pushed, DAY2 committed but refused by the remote: the working copy holds it alone."""
    commit_master(
        make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )
    hook = remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(GitPushError):
        commit_master(
            make_run(data, DAY2, ["c1,Sprout,Seed"]),
            identity(DAY2),
            SUMMARY,
            remote=str(remote),
            branch="main",
        )
    hook.unlink()
    return git(data / "git" / "work", "rev-parse", "HEAD").strip()


@pytest.mark.parametrize("damage", ["HEAD missing", "HEAD garbage", "tip commit object missing"])
def test_damaged_work_copy_with_unpushed_commit_fails_and_keeps_the_folder(
    tmp_path: Path, damage: str
) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    work = data / "git" / "work"
    unpushed = _unpushed_commit(data, remote)
    DAMAGES[damage](work / ".git")
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))

    with pytest.raises(GitExportError) as err:
        commit_master(
            make_run(data, DAY3, ["c1,Bloom,Sprout"]),
            identity(DAY3),
            SUMMARY,
            remote=str(remote),
            branch="main",
        )

    message = str(err.value)
    assert str(work) in message and "damaged" in message
    assert "not on the remote" in message and f"{unpushed[:12]} (refs/heads/main, reflog HEAD" in message
    assert "move the folder away" in message
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before
    assert (work / ".git" / "refs" / "heads" / "main").read_text().strip() == unpushed
    assert not list((data / "git").glob("work.damaged-*")) and not list((data / "git").glob("work.repair*"))
    assert len(remote_log(remote)) == 1


def test_unpushed_commit_is_pushed_once_the_operator_repairs_the_copy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    work = data / "git" / "work"
    unpushed = _unpushed_commit(data, remote)
    _rm_head(work / ".git")
    paths3 = make_run(data, DAY3, ["c1,Bloom,Sprout"])
    with pytest.raises(GitExportError, match="not on the remote"):
        commit_master(paths3, identity(DAY3), SUMMARY, remote=str(remote), branch="main")

    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # what the message asks for
    out = commit_master(paths3, identity(DAY3), SUMMARY, remote=str(remote), branch="main")

    assert out["pushed"] and out["changed"]
    assert len(remote_log(remote)) == 3 and unpushed in git(remote, "log", "--format=%H", "main")


def test_damaged_work_copy_whose_branches_cannot_be_read_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    work = data / "git" / "work"
    commit_master(
        make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )
    (work / ".git" / "refs" / "heads" / "main").write_text("garbage\n")

    with pytest.raises(GitExportError) as err:
        commit_master(
            make_run(data, DAY2, ["c1,Sprout,Seed"]),
            identity(DAY2),
            SUMMARY,
            remote=str(remote),
            branch="main",
        )

    assert str(work) in str(err.value) and "cannot be read" in str(err.value)
    assert (work / ".git" / "refs" / "heads" / "main").read_text() == "garbage\n"
    assert not list((data / "git").glob("work.damaged-*"))
    assert len(remote_log(remote)) == 1


def test_unreadable_index_is_removed_and_unpushed_commit_survives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    remote = default_remote(data)
    work = data / "git" / "work"
    unpushed = _unpushed_commit(data, remote)
    (work / ".git" / "index").write_bytes(b"DIRC\x00\x00\x00\x02 truncated")

    out = commit_master(
        make_run(data, DAY3, ["c1,Bloom,Sprout"]), identity(DAY3), SUMMARY, remote=str(remote), branch="main"
    )

    assert out["pushed"] and out["changed"]
    assert len(remote_log(remote)) == 3 and unpushed in git(remote, "log", "--format=%H", "main")
    assert not list((data / "git").glob("work.damaged-*"))
    assert "index of the git working copy" in caplog.text


def test_damaged_work_copy_never_sends_git_to_an_enclosing_repository(tmp_path: Path) -> None:
    """A .git that git does not recognise used to make it walk up, here into the project's checkout."""
    outer = tmp_path / "outer"
    outer.mkdir()
    git(outer, "init", "-q", "--initial-branch=trunk")
    (outer / "precious.txt").write_text("keep me\n")
    git(outer, "add", "precious.txt")
    git(outer, "commit", "-qm", "outer")
    outer_head = git(outer, "rev-parse", "HEAD").strip()
    data = outer / "data"
    remote = default_remote(data)
    commit_master(
        make_run(data, DAY1, ["c1,Seed,None"]), identity(DAY1), SUMMARY, remote=str(remote), branch="main"
    )
    _rm_head(data / "git" / "work" / ".git")

    out = commit_master(
        make_run(data, DAY2, ["c1,Sprout,Seed"]), identity(DAY2), SUMMARY, remote=str(remote), branch="main"
    )

    assert out["pushed"]
    assert git(outer, "remote") == "" and git(outer, "rev-parse", "HEAD").strip() == outer_head
    assert git(outer, "symbolic-ref", "HEAD").strip() == "refs/heads/trunk"
    assert (outer / "precious.txt").read_text() == "keep me\n"


# --------------------------------------------------------------------------------------------
# SSH host keys


@pytest.mark.parametrize("auth", [None, GitAuth.from_fields(None, "git", None, {})], ids=["no-conn", "conn"])
def test_default_ssh_environment_checks_host_keys(auth: GitAuth | None) -> None:
    with git_environment(parse_remote("git@example.invalid:org/tiers.git"), auth) as env:
        command = env["GIT_SSH_COMMAND"]
    assert "StrictHostKeyChecking=yes" in command
    assert "/dev/null" not in command


def test_ssh_that_git_runs_is_told_to_check_host_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "ssh-argv"
    bindir = tmp_path / "bin"
    _fake_program(bindir, "ssh", f'echo "$@" >> "{record}"\necho "fake ssh: no route" >&2\nexit 255')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")

    with pytest.raises(GitExportError, match="no route"):
        commit_master(
            make_run(tmp_path / "data", DAY1, ["c1,Seed,None"]),
            identity(DAY1),
            SUMMARY,
            remote="git@example.invalid:org/tiers.git",
            branch="main",
        )

    argv = record.read_text()
    assert "StrictHostKeyChecking=yes" in argv and "example.invalid" in argv


def test_known_hosts_content_from_the_connection(tmp_path: Path) -> None:
    line = "example.invalid ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0123456789abcdefghij"
    auth = GitAuth.from_fields(None, "git", None, {"known_hosts": line})
    with git_environment(parse_remote("git@example.invalid:org/tiers.git"), auth) as env:
        command = env["GIT_SSH_COMMAND"]
        path = command.split("UserKnownHostsFile=", 1)[1].split()[0]
        assert Path(path).read_text() == line + "\n"
        assert "StrictHostKeyChecking=yes" in command
    assert not os.path.exists(path)
    with pytest.raises(GitExportError, match="not both"):
        GitAuth.from_fields(None, "git", None, {"known_hosts": line, "known_hosts_file": "/etc/kh"})


@pytest.mark.parametrize(("value", "expected"), [("no", "no"), ("off", "off"), (False, "no"), ("NO", "no")])
def test_unchecked_host_keys_only_when_configured_and_warned(
    value: object, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    auth = GitAuth.from_fields(None, "git", None, {"strict_host_key_checking": value})
    with git_environment(parse_remote("ssh://git@example.invalid/tiers.git"), auth) as env:
        command = env["GIT_SSH_COMMAND"]
    assert f"StrictHostKeyChecking={expected}" in command and "UserKnownHostsFile=/dev/null" in command
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("host keys are not checked" in m and "git_default" in m for m in warnings)


def test_accept_new_is_passed_through_and_ask_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    auth = GitAuth.from_fields(None, "git", None, {"strict_host_key_checking": "accept-new"})
    with git_environment(parse_remote("ssh://git@example.invalid/tiers.git"), auth) as env:
        assert "StrictHostKeyChecking=accept-new" in env["GIT_SSH_COMMAND"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    for bad in ("ask", "maybe"):  # nobody can answer ssh's question from a task
        with pytest.raises(GitExportError, match="strict_host_key_checking"):
            GitAuth.from_fields(None, "git", None, {"strict_host_key_checking": bad})
