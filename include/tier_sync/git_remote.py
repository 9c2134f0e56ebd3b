"""Connection, remote and subprocess plumbing for the git export (git_export.py does the commit).

Everything that touches credentials lives here, so the rules about them can be checked in one file:

- Authentication comes from the Airflow connection `git_default` (providers-git field layout:
  host = repository URL, login = user, password = token, extras for SSH keys). The token reaches
  git only through a credential helper that reads an environment variable of the git subprocess;
  it is never in a URL, an argv, the working copy's config, a commit or a log line. A remote URL
  that embeds credentials is refused rather than silently used.
- The remote is chosen in one place, `resolve_remote`.
- `_Git` runs every git command with that per-export environment and scrubs secrets from errors.
- Transports are pinned: `parse_remote` accepts local paths, file://, http(s):// and ssh only (never
  a `<transport>::<address>` helper such as ext:: or fd::, which runs commands), and every git
  subprocess gets `GIT_ALLOW_PROTOCOL` with exactly those, so git itself refuses any other one,
  including in a submodule URL or a redirect.
- A token is never sent over plain http:// unless the connection opts in (extra
  `allow_insecure_http`, for a local test server); SSH checks host keys (`yes`) unless the
  connection says otherwise, and a connection that turns checking off is logged as a warning.

Why not `GitHook.configure_hook_env()` from providers-git: it writes the token into the worker's
process-wide `os.environ` for the duration of the block (visible to every thread and subprocess
started meanwhile), it silently strips and *uses* credentials embedded in a URL (we must refuse
them), and it needs the connection to exist (a local remote needs none). We keep its connection
fields and its credential-helper technique (scoped to the repository's host, other helpers reset so
a deployment-wide `store` helper cannot persist the token) but apply them to one subprocess env.
"""

from __future__ import annotations

import contextlib
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
from typing import Any, Literal
from urllib.parse import urlsplit

from include.tier_sync import fileio, ledger
from include.tier_sync.settings import GIT_CONN_ID

log = logging.getLogger(__name__)

DEFAULT_AUTHOR_NAME = "customer-tier-sync"
DEFAULT_AUTHOR_EMAIL = "tier-sync@localhost"
GIT_TIMEOUT_SECONDS = 300.0

# Names of the variables that carry secrets into the git subprocess (never into its argv).
TOKEN_ENV = "TIER_SYNC_GIT_TOKEN"
USER_ENV = "TIER_SYNC_GIT_USER"
PASSPHRASE_ENV = "TIER_SYNC_GIT_SSH_PASSPHRASE"

# Exactly what parse_remote accepts (git+ssh:// and scp-like remotes are git's "ssh", local paths its
# "file"): git refuses every other transport, whatever a URL, a config or a redirect asks for.
ALLOWED_PROTOCOLS = ("file", "http", "https", "ssh")
# "ask" is not offered: nobody can answer ssh's prompt from a task.
_VALID_HOST_KEY_CHECKING = frozenset({"yes", "accept-new", "no", "off"})
_UNCHECKED_HOST_KEYS = frozenset({"no", "off"})
# git's rule for a remote helper (`<transport>::<address>`, e.g. ext::<command>, fd::<fd>).
_TRANSPORT_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_SCP_LIKE = re.compile(r"^(?:[^/@:]+@)?[^/:]+:(?!//)")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
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


@dataclass(frozen=True)
class GitAuth:
    """What the `git` connection contributes (providers-git field layout); secrets hidden from repr."""

    host: str | None = None
    user: str = "user"
    token: str | None = field(default=None, repr=False)
    key_file: str | None = None
    private_key: str | None = field(default=None, repr=False)
    private_key_passphrase: str | None = field(default=None, repr=False)
    strict_host_key_checking: str = "yes"
    known_hosts_file: str | None = None
    known_hosts: str | None = field(default=None, repr=False)
    ssh_config_file: str | None = None
    ssh_port: int | None = None
    author_name: str = DEFAULT_AUTHOR_NAME
    author_email: str = DEFAULT_AUTHOR_EMAIL
    allow_insecure_http: bool = False
    conn_id: str = GIT_CONN_ID

    @classmethod
    def from_fields(
        cls,
        host: str | None,
        login: str | None,
        password: str | None,
        extra: Mapping[str, Any] | None,
        conn_id: str = GIT_CONN_ID,
    ) -> GitAuth:
        """Build from connection fields; validates what providers-git validates, and our extras."""
        extra = dict(extra or {})
        for one, other in (("key_file", "private_key"), ("known_hosts_file", "known_hosts")):
            if extra.get(one) and extra.get(other):
                raise GitExportError(
                    f"git connection {conn_id!r}: set either extra {one!r} or {other!r}, not both"
                )
        return cls(
            host=host or None,
            user=login or "user",
            token=password or None,
            key_file=extra.get("key_file") or None,
            private_key=extra.get("private_key") or None,
            private_key_passphrase=extra.get("private_key_passphrase") or None,
            strict_host_key_checking=_host_key_checking(extra, conn_id),
            known_hosts_file=extra.get("known_hosts_file") or None,
            known_hosts=extra.get("known_hosts") or None,
            ssh_config_file=extra.get("ssh_config_file") or None,
            ssh_port=int(extra["ssh_port"]) if extra.get("ssh_port") else None,
            author_name=str(extra.get("author_name") or DEFAULT_AUTHOR_NAME),
            author_email=str(extra.get("author_email") or DEFAULT_AUTHOR_EMAIL),
            allow_insecure_http=_flag(extra, "allow_insecure_http", conn_id),
            conn_id=conn_id,
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.token, self.private_key_passphrase) if s)


def _host_key_checking(extra: Mapping[str, Any], conn_id: str) -> str:
    """`yes` unless the connection says otherwise (a host key is known before git trusts a host)."""
    raw = extra.get("strict_host_key_checking")
    if raw is None or raw == "":
        return "yes"
    if isinstance(raw, bool):  # a YAML `no` arrives as False
        raw = "yes" if raw else "no"
    checking = str(raw).strip().lower()
    if checking not in _VALID_HOST_KEY_CHECKING:
        raise GitExportError(
            f"git connection {conn_id!r}: extra strict_host_key_checking is {raw!r}; use one of "
            f"{sorted(_VALID_HOST_KEY_CHECKING)} (yes, the default, needs the host key in known_hosts)"
        )
    return checking


def _flag(extra: Mapping[str, Any], name: str, conn_id: str) -> bool:
    """A boolean extra: true/false (or yes/no, 1/0); anything else is an error, never a guess."""
    raw = extra.get(name)
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    value = str(raw).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0", ""):
        return False
    raise GitExportError(f"git connection {conn_id!r}: extra {name} is {raw!r}; use true or false")


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
    return GitAuth.from_fields(conn.host, conn.login, conn.password, conn.extra_dejson, conn_id)


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
    if _TRANSPORT_HELPER.match(remote):
        # git would hand the address to git-remote-<transport>; ext:: runs it as a command.
        transport = remote.split("::", 1)[0]
        raise GitExportError(
            f"git remote uses the transport {transport + '::'!r}, which is not supported (ext:: and "
            f"fd:: run commands or use file descriptors); use a local path, file://, http(s):// or ssh"
        )
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
    """`<data_dir>/git/tiers.git`, or None for an object-storage data dir (no local default)."""
    if not fileio.is_local(data_dir):
        return None
    return os.path.abspath(os.path.join(fileio.local_path(data_dir), ledger.GIT_DIR, "tiers.git"))


def resolve_remote(data_dir: str, auth: GitAuth | None, variable: str | None = None) -> str:
    """The one place the remote is chosen: Variable `tier_sync_git_remote` if set, else the host of
    the `git_default` connection, else the local default under the data dir."""
    from include.tier_sync import settings

    if variable is None:
        variable = settings.git_remote_variable()
    if variable:
        return variable
    if auth is not None and auth.host:
        return auth.host
    default = default_remote_path(data_dir)
    if default is None:
        raise GitExportError(
            f"no git remote: set Variable {settings.VAR_GIT_REMOTE} or the host of connection "
            f"{GIT_CONN_ID!r} (the data dir {data_dir} is object storage, so there is no local default)"
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
    check_transport(remote, auth)
    # Airflow connections defined as env vars hold secrets git has no use for.
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV and not k.startswith("AIRFLOW_CONN_")}
    env.update(
        {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_TRACE_REDACT": "1",
            "GIT_ALLOW_PROTOCOL": ":".join(ALLOWED_PROTOCOLS),
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
        if remote.kind == "ssh":  # without a connection too: host keys are checked all the same
            _add_ssh_command(env, auth or GitAuth(), helper_dir)
        yield env


def check_transport(remote: Remote, auth: GitAuth | None) -> None:
    """Refuse to send a token over plain http:// unless the connection opted in (local tests)."""
    if auth is None or not auth.token or urlsplit(remote.url).scheme.lower() != "http":
        return
    shown = display_remote(remote.url)
    if not auth.allow_insecure_http:
        raise GitExportError(
            f"git remote {shown} is plain http://: the token of connection {auth.conn_id!r} would travel "
            f"unencrypted. Use an https:// remote; only for a local test server, set "
            f'"allow_insecure_http": true in the extra of connection {auth.conn_id!r}'
        )
    log.warning(
        "Sending the token of connection %s to %s over plain http (extra allow_insecure_http is set)",
        auth.conn_id,
        shown,
    )


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
    known_hosts = auth.known_hosts_file
    if auth.known_hosts:
        known_hosts = os.path.join(helper_dir, "known_hosts")
        with open(known_hosts, "w") as fh:
            fh.write(auth.known_hosts if auth.known_hosts.endswith("\n") else auth.known_hosts + "\n")
    if known_hosts:
        parts += ["-o", f"UserKnownHostsFile={shlex.quote(known_hosts)}"]
    elif auth.strict_host_key_checking in _UNCHECKED_HOST_KEYS:
        parts += ["-o", "UserKnownHostsFile=/dev/null"]
    if auth.strict_host_key_checking in _UNCHECKED_HOST_KEYS:
        log.warning(
            "SSH host keys are not checked (connection %s, extra strict_host_key_checking=%s): anyone "
            "on the network path can pose as the git host; set it to yes and supply known_hosts",
            auth.conn_id,
            auth.strict_host_key_checking,
        )
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
