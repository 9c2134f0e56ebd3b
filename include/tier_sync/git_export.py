"""Commit and push the master CSV (and the tier history) to the tier-sync git remote.

The original system kept customer_analytics_master.csv under version control, so every day's tiers
can be diffed and restored. This module does the export itself: sync the working copy with the
remote, replay commits an earlier run could not push, commit this run's files, push with retries.
Credentials, the choice of remote and the git subprocess are git_remote.py's job.

- A rerun of the same run, or a run whose files did not change, makes no commit.
- Whether the master is replaced comes from the run ledger (a backfill of an older day keeps the
  newer master), never from trailers found in the remote's history.
- A push that loses a race is replayed onto the new remote tip and retried; a push refused for any
  other reason raises `GitPushError` and keeps the local commit, which the next run pushes.
- A damaged working copy is set aside (`work.damaged-<UTC time>`) and cloned afresh, but only when
  every commit it may hold is on the remote; otherwise the run fails naming the folder, so an
  unpushed commit is never dropped. An unreadable index alone is just removed (it holds nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from include.tier_sync import fileio, ledger, spreadsheet
from include.tier_sync.git_remote import (
    GitExportError,
    _Git,
    default_remote_path,
    display_remote,
    git_environment,
    load_git_auth,
    parse_remote,
    resolve_remote,
)
from include.tier_sync.ledger import HISTORY_FILE, MASTER_FILE
from include.tier_sync.runtime import iso, to_utc
from include.tier_sync.settings import GIT_CONN_ID

if TYPE_CHECKING:
    from include.tier_sync.git_remote import Remote
    from include.tier_sync.ledger import RunPaths

log = logging.getLogger(__name__)

RUN_TRAILER = "Tier-Sync-Run"
AS_OF_TRAILER = "Tier-Sync-As-Of"
RUN_ID_TRAILER = "Airflow-Run-Id"
DEFAULT_MAX_PUSH_ATTEMPTS = 5

_NON_FAST_FORWARD = re.compile(r"\[rejected\].*\((?:fetch first|non-fast-forward)\)")
_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
_NULL_SHA = re.compile(r"^0+$")


class GitPushError(GitExportError):
    """The push failed for good; the local commit is kept and the next run pushes it."""


# ---------------------------------------------------------------------------------------------
# Commit message


def _moves(changes_summary: Mapping[str, Any]) -> dict[str, int]:
    """Per-move counts from `{"moves": {"A -> B": n}}`, `{"moves": {(A, B): n}}` or a list of
    `{"from"|"previous_tier", "to"|"tier", "count"}` rows."""
    raw = changes_summary.get("moves") or {}
    out: dict[str, int] = {}
    if isinstance(raw, Mapping):
        items = [
            (" -> ".join(str(p) for p in k) if isinstance(k, tuple) else str(k), int(v))
            for k, v in raw.items()
        ]
    else:
        items = []
        for row in raw:
            src = row.get("from", row.get("previous_tier"))
            dst = row.get("to", row.get("tier"))
            items.append((f"{src} -> {dst}", int(row.get("count", 1))))
    for key, count in items:
        if count:
            out[key] = out.get(key, 0) + count
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def build_commit_message(
    identity: Mapping[str, Any], run_key: str, as_of: str, changes_summary: Mapping[str, Any], note: str = ""
) -> str:
    """Subject names the run and the change count; trailers let a rerun find its own commit."""
    moves = _moves(changes_summary)
    total = changes_summary.get("changes", changes_summary.get("total"))
    n = int(total) if total is not None else sum(moves.values())
    run_id = identity.get("run_id") or run_key
    lines = [f"Tier sync {as_of}: {n} tier change{'' if n == 1 else 's'} (run {run_id})", ""]
    if moves:
        lines += [f"{move}: {count}" for move, count in moves.items()]
    else:
        lines.append("No tier moves.")
    if note:
        lines += ["", note]
    lines += ["", f"{RUN_TRAILER}: {run_key}", f"{AS_OF_TRAILER}: {as_of}"]
    if identity.get("run_id"):
        lines.append(f"{RUN_ID_TRAILER}: {identity['run_id']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The export


def work_dir(paths: RunPaths) -> str:
    """`<data_dir>/git/work`; for an object-storage data dir, a local folder under AIRFLOW_HOME."""
    if fileio.is_local(paths.data_dir):
        return os.path.abspath(os.path.join(fileio.local_path(paths.git_dir), "work"))
    from include.tier_sync import settings

    digest = hashlib.sha256(paths.data_dir.encode()).hexdigest()[:12]
    return os.path.join(settings.airflow_home(), "tier_sync_git", digest, "work")


def commit_master(
    paths: RunPaths,
    identity: Mapping[str, Any],
    changes_summary: Mapping[str, Any],
    *,
    remote: str | None = None,
    branch: str | None = None,
    conn_id: str = GIT_CONN_ID,
    max_push_attempts: int = DEFAULT_MAX_PUSH_ATTEMPTS,
    without_contacts: bool = False,
) -> dict[str, Any]:
    """Commit the run's master CSV and the tier history at the repo root, then push.

    `without_contacts` (Variable tier_sync_git_without_contacts) commits the master without
    `master_csv.CONTACT_COLUMNS`; the data dir keeps the full file.

    `remote`/`branch` default to `resolve_remote()` / `settings.git_branch()`. Returns
    `{"commit", "pushed", "changed", "remote", "branch"}`: `changed` = this call made a commit;
    `commit` = that commit, or this run's earlier commit when the call was a rerun, else None;
    `pushed` = this call pushed something (its own commit or one a failed run left behind).
    """
    auth = load_git_auth(conn_id)
    target = parse_remote(remote or resolve_remote(paths.data_dir, auth))
    if branch is None:
        from include.tier_sync import settings

        branch = settings.git_branch()
    sources = _sources(paths)
    work = work_dir(paths)
    as_of = to_utc(identity.get("as_of") or paths.as_of)
    # The environment first: it refuses an unsafe transport before anything is written.
    # One export per working copy at a time (parallel runs or backfills share it).
    with git_environment(target, auth) as env, fileio.exclusive_lock(os.path.join(os.path.dirname(work), "work.lock")):
        # git never looks above the working copy's folder (a damaged .git would else send it to an
        # enclosing repository, e.g. the project's own checkout).
        env = {**env, "GIT_CEILING_DIRECTORIES": os.path.dirname(work)}
        git = _Git(work, env, auth.secrets if auth else ())
        _ensure_remote(git, target, paths, branch)
        _check_work_copy(git, target, branch)
        _prepare(git, target, branch)
        newest = _ledger_newest(paths)
        _sync(git, branch, newest)
        drop = _contact_columns() if without_contacts else ()
        result = _commit(git, sources, paths.key, as_of, identity, changes_summary, newest, drop)
        pushed = False
        if _unpushed(git, branch):
            pushed = _push(git, target, branch, max_push_attempts, newest)
    out = {**result, "pushed": pushed, "remote": display_remote(target.url), "branch": branch}
    log.info(
        "commit_csv: run %s -> %s (branch %s): changed=%s commit=%s pushed=%s",
        paths.key,
        out["remote"],
        branch,
        out["changed"],
        out["commit"],
        pushed,
    )
    return out


def _ledger_newest(paths: RunPaths) -> datetime | None:
    """The newest published as_of, from the run ledger (future values there are ignored)."""
    newest = ledger.newest_published_as_of(paths)
    return to_utc(newest) if newest else None


def _sources(paths: RunPaths) -> dict[str, str]:
    if not fileio.exists(paths.run_master_csv):
        raise GitExportError(
            f"run master CSV {paths.run_master_csv} is missing: compute_tiers writes it first"
        )
    sources = {MASTER_FILE: paths.run_master_csv}
    if fileio.exists(paths.tier_history):
        sources[HISTORY_FILE] = paths.tier_history
    return sources


def _ensure_remote(git: _Git, target: Remote, paths: RunPaths, branch: str) -> None:
    """Create the default bare repository under the data dir on first use; nothing else."""
    if target.kind != "local" or os.path.exists(target.local_path):
        return
    if target.local_path != default_remote_path(paths.data_dir):
        raise GitExportError(
            f"git remote {target.local_path} does not exist; create it (git init --bare) or fix the "
            f"Variable tier_sync_git_remote / connection host"
        )
    os.makedirs(target.local_path, exist_ok=True)
    git.run(
        "init", "--quiet", "--bare", f"--initial-branch={branch}", target.local_path, cwd=target.local_path
    )
    log.info("Created the bare repository %s (branch %s)", target.local_path, branch)


def _prepare(git: _Git, target: Remote, branch: str) -> None:
    """A working copy whose `origin` is the remote (git is never given credentials in the URL)."""
    os.makedirs(git.cwd, exist_ok=True)
    if not os.path.isdir(os.path.join(git.cwd, ".git")):
        git.run("init", "--quiet", f"--initial-branch={branch}")
    stale = os.path.join(git.cwd, ".git", "index.lock")
    if os.path.exists(stale):  # left by a killed task; we hold the working-copy lock, so it is stale
        log.warning("Removing stale %s", stale)
        os.unlink(stale)
    url = _origin_url(target)
    if git.ok("remote", "get-url", "origin"):
        git.run("remote", "set-url", "origin", url)
    else:
        git.run("remote", "add", "origin", url)


def _origin_url(target: Remote) -> str:
    return target.local_path if target.kind == "local" else target.url


# ---------------------------------------------------------------------------------------------
# A damaged working copy


class _Unreadable(Exception):
    """The damaged copy's branches cannot be read, so it may hold commits nobody can list."""


def _check_work_copy(git: _Git, target: Remote, branch: str) -> None:
    """Replace a damaged working copy by a fresh clone, only when the remote has all its commits."""
    damage = _damage(git)
    if damage is None:
        return
    shown = display_remote(target.url)
    try:
        tips = _local_tips(os.path.join(git.cwd, ".git"))
    except _Unreadable as exc:
        raise GitExportError(
            _kept_message(
                git.cwd,
                damage,
                f"its branches cannot be read ({exc}), so it may hold commits never pushed to {shown}",
            )
        ) from None
    fresh = _fresh_clone(git, target, branch)
    try:
        missing = _not_on_remote(fresh, tips)
        if missing:
            why = f"it holds commits that are not on the remote {shown}: {'; '.join(missing)}"
            raise GitExportError(_kept_message(git.cwd, damage, why))
        aside = _set_aside(git.cwd)
        os.rename(fresh.cwd, git.cwd)
    except BaseException:
        shutil.rmtree(fresh.cwd, ignore_errors=True)
        raise
    log.warning(
        "The git working copy was damaged (%s); every commit it held is on %s, so it was set aside as %s "
        "and cloned afresh (delete the old folder once you no longer need it)",
        damage,
        shown,
        aside,
    )


def _kept_message(work: str, damage: str, why: str) -> str:
    return (
        f"the git working copy {work} is damaged ({damage}) and {why}. Nothing was changed or pushed. "
        f"Save those commits first (e.g. copy the folder, repair it or `git fsck` it, push what it holds), "
        f"then move the folder away (e.g. to {os.path.basename(work)}.damaged-<date> next to it): the next "
        f"run clones the remote afresh"
    )


def _damage(git: _Git) -> str | None:
    """What is wrong with the working copy, or None when it is sound (or not there yet)."""
    dot_git = os.path.join(git.cwd, ".git")
    if not os.path.lexists(dot_git):
        return None  # a first run: _prepare initialises it
    if os.path.islink(dot_git) or not os.path.isdir(dot_git):
        return ".git is not a folder"
    proc = git.run("rev-parse", "--absolute-git-dir", check=False)
    if "safe.directory" in proc.stderr:  # not damage: the folder belongs to another user
        raise GitExportError(f"git refuses the working copy {git.cwd}: {git.scrub(proc.stderr)}")
    if proc.returncode != 0 or os.path.realpath(proc.stdout.strip()) != os.path.realpath(dot_git):
        return "git does not recognise .git as a repository: HEAD, objects or refs missing or unreadable"
    if git.run("ls-files", "--stage", check=False).returncode != 0:
        # Every run rewrites its files and checks out with --force: the index holds nothing to keep.
        log.warning("The index of the git working copy %s is unreadable; removing it", git.cwd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(dot_git, "index"))
    fsck = git.run("fsck", "--no-progress", "--no-dangling", check=False)
    if fsck.returncode != 0:
        lines = [line for line in f"{fsck.stdout}\n{fsck.stderr}".splitlines() if line.strip()]
        return "git fsck: " + git.scrub("; ".join(lines[:3]) or f"exit {fsck.returncode}")
    return None


def _local_tips(dot_git: str) -> dict[str, str]:
    """Every commit a branch of the damaged copy points or last pointed to (refs, packed-refs and
    the reflogs, which also hold a detached HEAD's commits), read from the files themselves."""
    heads = os.path.join(dot_git, "refs", "heads")
    packed = os.path.join(dot_git, "packed-refs")
    if not os.path.isdir(heads) and not os.path.isfile(packed):
        raise _Unreadable("refs/heads is missing")
    tips: dict[str, str] = {}
    for path in _files_under(heads):
        ref = os.path.relpath(path, dot_git)
        value = _read_text(path, ref).strip()
        if not value.startswith("ref: "):  # a symbolic ref points at one read here anyway
            tips[ref] = _sha(value, ref)
    if os.path.isfile(packed):
        for line in _read_text(packed, "packed-refs").splitlines():
            if line and not line.startswith(("#", "^")):
                sha, _, ref = line.partition(" ")
                if ref.startswith("refs/heads/"):
                    tips.setdefault(ref, _sha(sha, "packed-refs"))
    logs = os.path.join(dot_git, "logs")
    for path in [os.path.join(logs, "HEAD"), *_files_under(os.path.join(logs, "refs", "heads"))]:
        name = "reflog " + os.path.relpath(path, logs)
        lines = _read_text(path, name).splitlines() if os.path.isfile(path) else []
        if lines:
            tips[name] = _sha(lines[-1].split(" ", 2)[1] if " " in lines[-1] else "", name)
    head = os.path.join(dot_git, "HEAD")
    if os.path.isfile(head) and _SHA.match(value := _read_text(head, "HEAD").strip()):
        tips["HEAD"] = value  # detached; a garbled HEAD names no commit and hides none
    return {ref: sha for ref, sha in tips.items() if not _NULL_SHA.match(sha)}


def _files_under(folder: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _dirs, files in os.walk(folder) for name in files)


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise _Unreadable(f"{what}: {exc.__class__.__name__}") from None


def _sha(value: str, what: str) -> str:
    if not _SHA.match(value):
        raise _Unreadable(f"{what} does not hold a commit id")
    return value


def _fresh_clone(git: _Git, target: Remote, branch: str) -> _Git:
    """The remote's branches in a new working copy next to the damaged one (same file system)."""
    fresh = _Git(f"{git.cwd}.repair", git.env, git.secrets)
    shutil.rmtree(fresh.cwd, ignore_errors=True)  # left by a killed run; we hold the lock
    os.makedirs(fresh.cwd)
    try:
        fresh.run("init", "--quiet", f"--initial-branch={branch}")
        fresh.run("remote", "add", "origin", _origin_url(target))
        fresh.run("fetch", "--quiet", "--no-tags", "origin", "+refs/heads/*:refs/remotes/origin/*")
    except GitExportError as exc:
        shutil.rmtree(fresh.cwd, ignore_errors=True)
        raise GitExportError(
            f"the git working copy {git.cwd} is damaged and could not be compared with the remote "
            f"{display_remote(target.url)} ({exc}); nothing was changed"
        ) from None
    return fresh


def _not_on_remote(fresh: _Git, tips: Mapping[str, str]) -> list[str]:
    """`<commit> (<where the copy has it>)` for each commit no branch of the remote contains."""
    names: dict[str, list[str]] = {}
    for ref, sha in tips.items():
        names.setdefault(sha, []).append(ref)
    return [
        f"{sha[:12]} ({', '.join(sorted(refs, key=lambda r: (r.startswith('reflog'), r)))})"
        for sha, refs in sorted(names.items(), key=lambda kv: sorted(kv[1]))
        if not _on_remote(fresh, sha)
    ]


def _on_remote(fresh: _Git, sha: str) -> bool:
    """The commit is in a branch of the remote (unknown to the fresh clone means: it is not)."""
    proc = fresh.run(
        "for-each-ref", f"--contains={sha}", "--format=%(refname)", "refs/remotes/origin/", check=False
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _set_aside(work: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = f"{work}.damaged-{stamp}"
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{work}.damaged-{stamp}-{n}"
    os.rename(work, aside)
    return aside


def _sync(git: _Git, branch: str, newest: datetime | None) -> str | None:
    """Fetch; start from the remote tip, or replay unpushed local commits onto it. Returns the tip."""
    listing = git.run("ls-remote", "--heads", "origin", f"refs/heads/{branch}").stdout.split()
    remote_ref = f"refs/remotes/origin/{branch}"
    if listing:
        git.run("fetch", "--quiet", "--no-tags", "origin", f"+refs/heads/{branch}:{remote_ref}")
    elif git.rev(remote_ref):
        git.run("update-ref", "-d", remote_ref)
    tip = git.rev(remote_ref)
    local = git.rev(f"refs/heads/{branch}")
    pending = _unpushed(git, branch)
    if not pending:
        if tip:
            git.run("checkout", "--quiet", "--force", "-B", branch, remote_ref)
        else:  # nothing anywhere yet: an unborn branch
            git.run("symbolic-ref", "HEAD", f"refs/heads/{branch}")
        return tip
    if tip is None or git.ok("merge-base", "--is-ancestor", remote_ref, local or "HEAD"):
        git.run("checkout", "--quiet", "--force", branch)  # a plain fast-forward will do
        return tip
    log.warning("Replaying %d unpushed commit(s) onto origin/%s", len(pending), branch)
    git.run("checkout", "--quiet", "--force", "-B", branch, remote_ref)
    for commit in pending:
        _replay(git, commit, newest)
    return tip


def _unpushed(git: _Git, branch: str) -> list[str]:
    """Local commits the remote branch does not have, oldest first."""
    local = f"refs/heads/{branch}"
    if not git.rev(local):
        return []
    remote_ref = f"refs/remotes/origin/{branch}"
    spec = [local, "--not", remote_ref] if git.rev(remote_ref) else [local]
    return git.out("rev-list", "--reverse", *spec).split()


def _replay(git: _Git, commit: str, newest: datetime | None) -> None:
    """Re-apply one of our commits on the new tip, whole files (a line merge of a CSV is wrong).

    `newest` is the run ledger's newest published as_of; a commit of an older day keeps the
    remote's master (the trailer read here is on our own unpushed commit, never a remote one).
    """
    as_of = _trailer(git, commit, AS_OF_TRAILER)
    for path in git.out("diff-tree", "--no-commit-id", "--name-only", "-r", "--root", commit).splitlines():
        if path == MASTER_FILE and as_of and newest and _parse_as_of(as_of) < newest:
            continue  # the remote already holds a newer day's master
        if git.ok("cat-file", "-e", f"{commit}:{path}"):
            git.run("checkout", commit, "--", path)
        else:
            git.run("rm", "--quiet", "--ignore-unmatch", "--", path)
    if git.run("diff", "--cached", "--quiet", check=False).returncode != 0:
        git.run("commit", "--quiet", "--no-verify", "--reuse-message", commit)


def _trailer(git: _Git, commit: str, key: str) -> str | None:
    value = git.out("log", "-1", f"--format=%(trailers:key={key},valueonly,separator=%x0A)", commit)
    return value.splitlines()[0].strip() if value else None


def _parse_as_of(value: str) -> datetime:
    return to_utc(value)


def _commit(
    git: _Git,
    sources: Mapping[str, str],
    key: str,
    as_of: datetime,
    identity: Mapping[str, Any],
    changes_summary: Mapping[str, Any],
    newest: datetime | None,
    drop_from_master: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Commit this run's files (the master without `drop_from_master`); the master only when no newer day has been published (the ledger
    decides, never a date found in the remote's history that anyone could have typed)."""
    note = ""
    files = dict(sources)
    if newest is not None and as_of < newest:
        files.pop(MASTER_FILE, None)
        note = f"Master CSV left as is: the repository already holds the newer run of {iso(newest)}."
        log.warning(
            "commit_csv: run %s is older than the committed %s; master CSV not replaced", key, iso(newest)
        )
    for name, url in files.items():
        data = fileio.read_bytes(url)
        if name == MASTER_FILE and drop_from_master:
            data = spreadsheet.without_columns(data, drop_from_master)
        _write_file(os.path.join(git.cwd, name), data)
    names = sorted(files)
    previous = _run_commit(git, key)
    if previous is not None and all(_same_blob(git, previous, name) for name in names):
        git.run("reset", "--quiet", "--hard", "HEAD")
        log.info(
            "commit_csv: run %s already committed as %s with these files; no new commit", key, previous[:12]
        )
        return {"commit": previous, "changed": False}
    git.run("add", "--", *names)
    if git.run("diff", "--cached", "--quiet", check=False).returncode == 0:
        log.info("commit_csv: files unchanged for run %s; no commit", key)
        return {"commit": previous, "changed": False}
    message = build_commit_message(identity, key, iso(as_of), changes_summary, note)
    git.run("commit", "--quiet", "--no-verify", "-F", "-", input=message)
    return {"commit": git.out("rev-parse", "HEAD"), "changed": True}


def _contact_columns() -> tuple[str, ...]:
    from include.tier_sync.master_csv import CONTACT_COLUMNS

    return CONTACT_COLUMNS


def _write_file(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _run_commit(git: _Git, key: str) -> str | None:
    """The newest commit in HEAD's history that carries this run's trailer."""
    if not git.rev("HEAD"):
        return None
    found = git.out("log", "-1", "--format=%H", "--fixed-strings", f"--grep={RUN_TRAILER}: {key}", "HEAD")
    return found or None


def _same_blob(git: _Git, commit: str, name: str) -> bool:
    proc = git.run("rev-parse", "--verify", "--quiet", f"{commit}:{name}", check=False)
    if proc.returncode != 0:
        return False
    return proc.stdout.strip() == git.out("hash-object", "--", name)


def _push(git: _Git, target: Remote, branch: str, max_attempts: int, newest: datetime | None) -> bool:
    """Push; on a lost race fetch, replay and retry (bounded); any other refusal raises."""
    shown = display_remote(target.url)
    last = ""
    for attempt in range(1, max_attempts + 1):
        pending = _unpushed(git, branch)
        if not pending:  # the replay found the remote already holds our files
            return False
        proc = git.run(
            "push",
            "--porcelain",
            "--no-verify",
            "origin",
            f"refs/heads/{branch}:refs/heads/{branch}",
            check=False,
        )
        if proc.returncode == 0:
            git.run("update-ref", f"refs/remotes/origin/{branch}", f"refs/heads/{branch}")
            return True
        last = git.scrub(f"{proc.stdout}\n{proc.stderr}")
        if not _NON_FAST_FORWARD.search(f"{proc.stdout}\n{proc.stderr}"):
            break
        log.warning(
            "Push to %s lost a race (attempt %d/%d); fetching and replaying", shown, attempt, max_attempts
        )
        _sync(git, branch, newest)
    pending = _unpushed(git, branch)
    raise GitPushError(
        f"push of {len(pending)} commit(s) to {shown} (branch {branch}) failed: {last or 'no output'}. "
        f"The commit(s) stay in the working copy {git.cwd}; the next run pushes them."
    )
