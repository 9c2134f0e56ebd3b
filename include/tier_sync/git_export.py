"""Commit and push the master CSV (and the tier history) to the tier-sync git remote.

The original system kept customer_analytics_master.csv under version control, so every day's tiers
can be diffed and restored. This module reproduces that with the `git` CLI and a per-call
environment, so:

- Authentication comes from the Airflow connection `git_default` (providers-git field layout:
  host = repository URL, login = user, password = token, extras for SSH keys). The token reaches
  git only through a credential helper that reads an environment variable of the git subprocess;
  it is never in a URL, an argv, the working copy's config, a commit or a log line. A remote URL
  that embeds credentials is refused rather than silently used.
- A rerun of the same run, or a run whose files did not change, makes no commit.
- A push that loses a race is replayed onto the new remote tip and retried; a push refused for any
  other reason raises `GitPushError` and keeps the local commit, which the next run pushes.

Why not `GitHook.configure_hook_env()` from providers-git: it writes the token into the worker's
process-wide `os.environ` for the duration of the block (visible to every thread and subprocess
started meanwhile), it silently strips and *uses* credentials embedded in a URL (we must refuse
them), and it needs the connection to exist (a local remote needs none). We keep its connection
fields and its credential-helper technique (scoped to the repository's host, other helpers reset so
a deployment-wide `store` helper cannot persist the token) but apply them to one subprocess env.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from include.tier_sync import fileio
from include.tier_sync.runtime import RunPaths, iso, to_utc
from include.tier_sync.settings import GIT_CONN_ID

log = logging.getLogger(__name__)

MASTER_FILE = "customer_analytics_master.csv"
HISTORY_FILE = "tier_history.csv"
RUN_TRAILER = "Tier-Sync-Run"
AS_OF_TRAILER = "Tier-Sync-As-Of"
RUN_ID_TRAILER = "Airflow-Run-Id"
DEFAULT_AUTHOR_NAME = "customer-tier-sync"
DEFAULT_AUTHOR_EMAIL = "tier-sync@localhost"
DEFAULT_MAX_PUSH_ATTEMPTS = 5
GIT_TIMEOUT_SECONDS = 300.0

# Names of the variables that carry secrets into the git subprocess (never into its argv).
TOKEN_ENV = "TIER_SYNC_GIT_TOKEN"
USER_ENV = "TIER_SYNC_GIT_USER"
PASSPHRASE_ENV = "TIER_SYNC_GIT_SSH_PASSPHRASE"

_VALID_HOST_KEY_CHECKING = frozenset({"yes", "no", "accept-new", "off", "ask"})
_SCP_LIKE = re.compile(r"^(?:[^/@:]+@)?[^/:]+:(?!//)")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_NON_FAST_FORWARD = re.compile(r"\[rejected\].*\((?:fetch first|non-fast-forward)\)")
# Inherited variables that would point git at another repository or print credentials.
_DROPPED_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_PREFIX",
    "GIT_CURL_VERBOSE",
    "GIT_TRACE_CURL",
    "GIT_TRACE_CURL_NO_DATA",
)


class GitExportError(RuntimeError):
    """The master CSV could not be committed (bad remote, git failure, missing input)."""


class GitPushError(GitExportError):
    """The push failed for good; the local commit is kept and the next run pushes it."""


@dataclass(frozen=True)
class GitAuth:
    """What the `git` connection contributes (providers-git field layout); secrets hidden from repr."""

    host: str | None = None
    user: str = "user"
    token: str | None = field(default=None, repr=False)
    key_file: str | None = None
    private_key: str | None = field(default=None, repr=False)
    private_key_passphrase: str | None = field(default=None, repr=False)
    strict_host_key_checking: str = "accept-new"
    known_hosts_file: str | None = None
    ssh_config_file: str | None = None
    ssh_port: int | None = None
    author_name: str = DEFAULT_AUTHOR_NAME
    author_email: str = DEFAULT_AUTHOR_EMAIL

    @classmethod
    def from_fields(
        cls,
        host: str | None,
        login: str | None,
        password: str | None,
        extra: Mapping[str, Any] | None,
    ) -> GitAuth:
        """Build from connection fields; validates what providers-git validates."""
        extra = dict(extra or {})
        if extra.get("key_file") and extra.get("private_key"):
            raise GitExportError("git connection: set either extra 'key_file' or 'private_key', not both")
        checking = str(extra.get("strict_host_key_checking") or "accept-new")
        if checking not in _VALID_HOST_KEY_CHECKING:
            raise GitExportError(
                f"git connection: strict_host_key_checking must be one of {sorted(_VALID_HOST_KEY_CHECKING)}"
            )
        return cls(
            host=host or None,
            user=login or "user",
            token=password or None,
            key_file=extra.get("key_file") or None,
            private_key=extra.get("private_key") or None,
            private_key_passphrase=extra.get("private_key_passphrase") or None,
            strict_host_key_checking=checking,
            known_hosts_file=extra.get("known_hosts_file") or None,
            ssh_config_file=extra.get("ssh_config_file") or None,
            ssh_port=int(extra["ssh_port"]) if extra.get("ssh_port") else None,
            author_name=str(extra.get("author_name") or DEFAULT_AUTHOR_NAME),
            author_email=str(extra.get("author_email") or DEFAULT_AUTHOR_EMAIL),
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.token, self.private_key_passphrase) if s)


def load_git_auth(conn_id: str = GIT_CONN_ID) -> GitAuth | None:
    """The connection's auth, or None when it is not defined (fine for a local remote)."""
    try:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:  # outside an Airflow install (bench scripts): no connection
        return None
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("No connection %s: the remote must need no credentials", conn_id)
        return None
    return GitAuth.from_fields(conn.host, conn.login, conn.password, conn.extra_dejson)


# ---------------------------------------------------------------------------------------------
# Remotes


@dataclass(frozen=True)
class Remote:
    """A validated remote: `url` is what git is given (never carries credentials)."""

    url: str
    kind: Literal["local", "http", "ssh"]

    @property
    def local_path(self) -> str:
        return os.path.abspath(os.path.expanduser(self.url.removeprefix("file://")))


def display_remote(remote: str) -> str:
    """The remote with any userinfo masked, safe for logs and messages."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", remote)


def parse_remote(remote: str) -> Remote:
    """Classify a remote and refuse one that embeds credentials or uses an unsupported scheme."""
    remote = remote.strip()
    if not remote:
        raise GitExportError("git remote is empty")
    if "://" in remote:
        parts = urlsplit(remote)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            if "@" in parts.netloc:
                # Hosts accept a token as the user name too, so any userinfo may be a secret.
                raise GitExportError(
                    f"git remote {display_remote(remote)} embeds credentials in the URL; remove them "
                    f"and put the user in the login and the token in the password of the Airflow "
                    f"connection {GIT_CONN_ID!r} instead"
                )
            return Remote(remote, "http")
        if scheme in ("ssh", "git+ssh"):
            if parts.password:
                raise GitExportError(
                    f"git remote {display_remote(remote)} embeds a password; use an SSH key in the "
                    f"Airflow connection {GIT_CONN_ID!r} (extra key_file or private_key)"
                )
            return Remote(remote, "ssh")
        if scheme == "file":
            return Remote(remote, "local")
        raise GitExportError(
            f"git remote scheme {scheme!r} is not supported; use a local path, file://, http(s):// or ssh"
        )
    if _SCP_LIKE.match(remote) and not os.path.exists(remote):
        return Remote(remote, "ssh")
    return Remote(os.path.abspath(os.path.expanduser(remote)), "local")


def default_remote_path(data_dir: str) -> str | None:
    """`<data_dir>/git/tiers.git` (settings.git_remote's default), or None for object storage."""
    if not fileio.is_local(data_dir):
        return None
    return os.path.abspath(os.path.join(fileio.local_path(data_dir), "git", "tiers.git"))


def resolve_remote(data_dir: str, auth: GitAuth | None) -> str:
    """Variable `tier_sync_git_remote` if set, else the connection's host, else the local default."""
    from include.tier_sync import settings

    try:
        configured: str | None = settings.git_remote()
    except ValueError:  # object-storage data dir and no Variable: only the connection can say
        configured = None
    settings_default = default_remote_path(settings.data_dir())
    variable_set = configured is not None and (
        settings_default is None or os.path.abspath(configured) != settings_default
    )
    if configured is not None and variable_set:
        return configured
    if auth is not None and auth.host:
        return auth.host
    default = default_remote_path(data_dir)
    if default is None:
        raise GitExportError(
            f"no git remote: set Variable {settings.VAR_GIT_REMOTE} or the host of connection "
            f"{GIT_CONN_ID!r} (the data dir {data_dir} is not local)"
        )
    return default


# ---------------------------------------------------------------------------------------------
# The git subprocess


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """Remove secrets and URL userinfo from text that goes into a log or an exception."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


@contextlib.contextmanager
def git_environment(remote: Remote, auth: GitAuth | None) -> Iterator[dict[str, str]]:
    """The environment of every git subprocess of one export; helper files live only inside it."""
    # Airflow connections defined as env vars hold secrets git has no use for.
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV and not k.startswith("AIRFLOW_CONN_")}
    env.update(
        {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_TRACE_REDACT": "1",
            "LC_ALL": "C",  # git's messages are parsed (non-fast-forward detection)
            "LANGUAGE": "C",
        }
    )
    name = auth.author_name if auth else DEFAULT_AUTHOR_NAME
    email = auth.author_email if auth else DEFAULT_AUTHOR_EMAIL
    env.update(
        {
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email,
        }
    )
    with tempfile.TemporaryDirectory(prefix="tier-sync-git-") as helper_dir:
        if auth is not None and auth.token and remote.kind == "http":
            _add_credential_helper(env, remote, auth, helper_dir)
        if auth is not None and remote.kind == "ssh":
            _add_ssh_command(env, auth, helper_dir)
        yield env


def _add_credential_helper(env: dict[str, str], remote: Remote, auth: GitAuth, helper_dir: str) -> None:
    """A credential helper scoped to the remote's host that answers from environment variables."""
    parts = urlsplit(remote.url)
    scope = f"{parts.scheme}://{parts.netloc}"
    helper = _write_script(
        helper_dir,
        "credential-helper.sh",
        f'#!/bin/sh\ncat > /dev/null\n[ "$1" = get ] || exit 0\n'
        f'printf \'username=%s\\npassword=%s\\n\' "${USER_ENV}" "${TOKEN_ENV}"\n',
    )
    try:
        index = int(env.get("GIT_CONFIG_COUNT", "0"))
    except ValueError:
        index = 0
    # An empty helper first resets helpers configured system- or user-wide: otherwise they could
    # answer before ours, and a `store` helper would persist the token on `approve`.
    env.update(
        {
            "GIT_CONFIG_COUNT": str(index + 2),
            f"GIT_CONFIG_KEY_{index}": f"credential.{scope}.helper",
            f"GIT_CONFIG_VALUE_{index}": "",
            f"GIT_CONFIG_KEY_{index + 1}": f"credential.{scope}.helper",
            f"GIT_CONFIG_VALUE_{index + 1}": "!" + shlex.quote(helper),
            USER_ENV: auth.user,
            TOKEN_ENV: auth.token or "",
        }
    )


def _add_ssh_command(env: dict[str, str], auth: GitAuth, helper_dir: str) -> None:
    """GIT_SSH_COMMAND from the connection's SSH extras (same options as providers-git)."""
    parts = ["ssh"]
    key_path = auth.key_file
    if auth.private_key:
        key_path = os.path.join(helper_dir, "id_key")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(auth.private_key if auth.private_key.endswith("\n") else auth.private_key + "\n")
    if key_path:
        parts += ["-i", shlex.quote(key_path), "-o", "IdentitiesOnly=yes"]
    parts += ["-o", f"StrictHostKeyChecking={auth.strict_host_key_checking}"]
    if auth.known_hosts_file:
        parts += ["-o", f"UserKnownHostsFile={shlex.quote(auth.known_hosts_file)}"]
    elif auth.strict_host_key_checking == "no":
        parts += ["-o", "UserKnownHostsFile=/dev/null"]
    if auth.ssh_config_file:
        parts += ["-F", shlex.quote(auth.ssh_config_file)]
    if auth.ssh_port:
        parts += ["-p", str(auth.ssh_port)]
    env["GIT_SSH_COMMAND"] = " ".join(parts)
    if auth.private_key_passphrase:
        askpass = _write_script(
            helper_dir, "ssh-askpass.sh", f"#!/bin/sh\nprintf '%s\\n' \"${PASSPHRASE_ENV}\"\n"
        )
        env.update(
            {
                "SSH_ASKPASS": askpass,
                "SSH_ASKPASS_REQUIRE": "force",
                PASSPHRASE_ENV: auth.private_key_passphrase,
            }
        )
        env.setdefault("DISPLAY", ":")


def _write_script(folder: str, name: str, content: str) -> str:
    # Closed before git runs it: Linux refuses to exec a file still open for writing (ETXTBSY).
    path = os.path.join(folder, name)
    with open(path, "w") as fh:
        fh.write(content)
    os.chmod(path, stat.S_IRWXU)
    return path


class _Git:
    """Runs `git` in one working copy with one environment; errors come back scrubbed."""

    def __init__(self, cwd: str, env: Mapping[str, str], secrets: Sequence[str]) -> None:
        self.cwd = cwd
        self.env = dict(env)
        self.secrets = tuple(secrets)

    def run(
        self, *args: str, check: bool = True, input: str | None = None, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        exe = shutil.which("git", path=self.env.get("PATH")) or "git"
        log.debug("git %s", " ".join(args))
        try:
            proc = subprocess.run(
                [exe, *args],
                cwd=cwd or self.cwd,
                env=self.env,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise GitExportError(f"git {args[0]} timed out after {GIT_TIMEOUT_SECONDS:.0f} s") from None
        except OSError as exc:
            raise GitExportError(f"cannot run git: {exc}") from None
        if check and proc.returncode != 0:
            raise GitExportError(f"git {args[0]} failed (exit {proc.returncode}): {self.scrub(proc.stderr)}")
        return proc

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.strip()

    def ok(self, *args: str) -> bool:
        return self.run(*args, check=False).returncode == 0

    def rev(self, ref: str) -> str | None:
        proc = self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        if proc.returncode != 0:
            return None
        return proc.stdout.strip() or None

    def scrub(self, text: str) -> str:
        return scrub(text.strip(), self.secrets)


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


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """One export per working copy at a time (parallel runs or backfills share it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def commit_master(
    paths: RunPaths,
    identity: Mapping[str, Any],
    changes_summary: Mapping[str, Any],
    *,
    remote: str | None = None,
    branch: str | None = None,
    conn_id: str = GIT_CONN_ID,
    max_push_attempts: int = DEFAULT_MAX_PUSH_ATTEMPTS,
) -> dict[str, Any]:
    """Commit the run's master CSV and the tier history at the repo root, then push.

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
    with _locked(os.path.join(os.path.dirname(work), "work.lock")), git_environment(target, auth) as env:
        git = _Git(work, env, auth.secrets if auth else ())
        _ensure_remote(git, target, paths, branch)
        _prepare(git, target, branch)
        _sync(git, branch)
        result = _commit(git, sources, paths.key, as_of, identity, changes_summary)
        pushed = False
        if _unpushed(git, branch):
            pushed = _push(git, target, branch, max_push_attempts)
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
    url = target.local_path if target.kind == "local" else target.url
    if git.ok("remote", "get-url", "origin"):
        git.run("remote", "set-url", "origin", url)
    else:
        git.run("remote", "add", "origin", url)


def _sync(git: _Git, branch: str) -> str | None:
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
        _replay(git, commit)
    return tip


def _unpushed(git: _Git, branch: str) -> list[str]:
    """Local commits the remote branch does not have, oldest first."""
    local = f"refs/heads/{branch}"
    if not git.rev(local):
        return []
    remote_ref = f"refs/remotes/origin/{branch}"
    spec = [local, "--not", remote_ref] if git.rev(remote_ref) else [local]
    return git.out("rev-list", "--reverse", *spec).split()


def _replay(git: _Git, commit: str) -> None:
    """Re-apply one of our commits on the new tip, whole files (a line merge of a CSV is wrong)."""
    as_of = _trailer(git, commit, AS_OF_TRAILER)
    newest = _newest_as_of(git)
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


def _newest_as_of(git: _Git) -> datetime | None:
    """The newest as_of whose master CSV is in HEAD's history (backfills must not regress it)."""
    if not git.rev("HEAD"):
        return None
    values = git.out(
        "log",
        "--format=%(trailers:key=" + AS_OF_TRAILER + ",valueonly,separator=%x0A)",
        "HEAD",
        "--",
        MASTER_FILE,
    )
    parsed = []
    for value in values.split():
        with contextlib.suppress(ValueError, TypeError):
            parsed.append(_parse_as_of(value))
    return max(parsed) if parsed else None


def _commit(
    git: _Git,
    sources: Mapping[str, str],
    key: str,
    as_of: datetime,
    identity: Mapping[str, Any],
    changes_summary: Mapping[str, Any],
) -> dict[str, Any]:
    note = ""
    newest = _newest_as_of(git)
    files = dict(sources)
    if newest is not None and as_of < newest:
        files.pop(MASTER_FILE, None)
        note = f"Master CSV left as is: the repository already holds the newer run of {iso(newest)}."
        log.warning(
            "commit_csv: run %s is older than the committed %s; master CSV not replaced", key, iso(newest)
        )
    for name, url in files.items():
        _write_file(os.path.join(git.cwd, name), fileio.read_bytes(url))
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


def _push(git: _Git, target: Remote, branch: str, max_attempts: int) -> bool:
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
        _sync(git, branch)
    pending = _unpushed(git, branch)
    raise GitPushError(
        f"push of {len(pending)} commit(s) to {shown} (branch {branch}) failed: {last or 'no output'}. "
        f"The commit(s) stay in the working copy {git.cwd}; the next run pushes them."
    )
