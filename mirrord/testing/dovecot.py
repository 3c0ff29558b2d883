"""A throwaway Dovecot on loopback, started under a directory of its own."""

from __future__ import annotations

import atexit
import datetime as _dt
import grp
import hashlib
import ipaddress
import itertools
import os
import pwd
import re
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from mirrord.testing._errors import DovecotError, DovecotMissing
from mirrord.testing.imapclient import ImapClient

T = TypeVar("T")

DOVECOT = Path("/usr/sbin/dovecot")
DOVEADM = Path("/usr/bin/doveadm")

#: When started by root, Dovecot refuses to let mail processes run as root, so
#: they (and the login and internal services) run as this account, which every
#: Debian system has.
ROOT_MAIL_USER = "nobody"

# Environment variables Dovecot's master imports and acts on. A test of
# mirrord's own sd_notify or socket activation may set them in os.environ; the
# private server must not answer in mirrord's place.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC")

# sun_path holds 107 bytes plus NUL; the longest socket name Dovecot 2.3 puts
# under base_dir is about 24 characters long.
_MAX_BASE_DIR_LEN = 107 - 26

_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
# Characters that Dovecot's config syntax or the static userdb's
# space-separated args would misread in a path.
_UNSAFE_PATH = re.compile(r"[\s%\"'#\\{}<>$]")

_SYSTEM_FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}


# --------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class _Identity:
    """Who Dovecot's unprivileged processes run as, and who owns the mail."""

    user: str
    group: str
    uid: int
    gid: int
    as_root: bool


def _current_identity() -> _Identity:
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(ROOT_MAIL_USER)
        except KeyError:
            raise DovecotError(
                f"running as root, the private Dovecot needs the unprivileged user "
                f"{ROOT_MAIL_USER!r} for its mail processes, and it does not exist"
            ) from None
        as_root = True
    else:
        pw = pwd.getpwuid(os.geteuid())
        as_root = False
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        group = str(pw.pw_gid)
    return _Identity(user=pw.pw_name, group=group, uid=pw.pw_uid, gid=pw.pw_gid, as_root=as_root)


def _free_port() -> int:
    """Ask the kernel for an unused loopback port.

    There is a window between closing this socket and Dovecot binding the
    port; :meth:`PrivateDovecot.start` retries with new ports if it loses.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _searchable_by(path: Path, uid: int, gid: int) -> bool:
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _dovecot_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def _write_certificates(tls_dir: Path, names: Sequence[str]) -> None:
    """Create a throwaway CA and a server certificate it signed.

    A CA rather than a lone self-signed certificate, so that clients exercise
    the same chain verification and hostname checks as against a real
    provider: trusting ``ca.pem`` is enough, and a wrong hostname still fails.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not names:
        raise ValueError("cert_names must name at least one host")
    now = _dt.datetime.now(_dt.timezone.utc)
    not_before = now - _dt.timedelta(days=1)
    not_after = now + _dt.timedelta(days=365)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mirrord tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, "mirrord throwaway test CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    tls_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    _write_file(tls_dir / "ca.key", key_pem(ca_key), 0o600)
    _write_file(tls_dir / "server.key", key_pem(server_key), 0o600)
    _write_file(tls_dir / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_file(tls_dir / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically, so a Dovecot process never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


DOVECOT_CAPABILITY = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
    "NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES "
    "WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW "
    "STATUS=SIZE SAVEDATE LITERAL+ NOTIFY"
)
"""What Dovecot 2.3 (Debian 12) lists after login by default."""


class PrivateDovecot:
    """A throwaway Dovecot IMAP server on 127.0.0.1, living entirely under ``root``.

    ``port`` is plain IMAP (STARTTLS offered) and ``imaps_port`` implicit TLS;
    clients verify the server against ``ca_file``. Both ports are chosen when
    the server first starts and kept across :meth:`stop` / :meth:`start`, so a
    test can take the server away and bring it back where mirrord expects it.

    Started by root, the mail, login and internal processes run as
    ``nobody``, which must be able to reach ``root``; a root in a directory
    of its own under the system temp dir (``tempfile.mkdtemp()``) is always
    fine. Started by anyone else, everything runs as that user.

    ``imap_capability`` replaces the capability list (to hide IDLE,
    CONDSTORE... from fallback tests); ``hide_capabilities`` is the short
    way to the same: Dovecot's default list (:data:`DOVECOT_CAPABILITY`)
    without the named ones, e.g. ``("CONDSTORE", "QRESYNC")`` for a server
    without the catch-up extensions; ``max_connections`` is
    ``mail_max_userip_connections``; ``cert_names`` are the DNS names and IP
    addresses the server certificate is valid for; ``compress`` loads the
    imap_zlib plugin, so that COMPRESS=DEFLATE (RFC 4978) is offered after
    login (may be changed between :meth:`stop` and :meth:`start`);
    ``oauth2_introspection_url``, when given, adds Dovecot's ``oauth2``
    passdb for the OAUTHBEARER and XOAUTH2 mechanisms, which asks that URL
    (``introspection_mode = post``, RFC 7662) about every token and logs in
    the user its ``username`` names (see
    :class:`mirrord.testing.oauthserver.IntrospectionServer`); PLAIN and LOGIN
    keep using the passwords. ``extra_config`` comes last in the config, so
    it can also override anything above it. ``auth_delay=False`` lifts
    Dovecot's delay after a failed login and its growing per-address penalty
    (measured: 0.5, 4.5, 8 s) for loopback, for tests that fail logins on purpose.
    """

    host: str = "127.0.0.1"
    user: str = "mirror"
    password: str = "secret pass"

    def __init__(
        self,
        root: Path,
        *,
        imap_capability: str | None = None,
        hide_capabilities: Sequence[str] = (),
        max_connections: int = 50,
        cert_names: Sequence[str] = ("localhost", "127.0.0.1"),
        extra_config: str = "",
        compress: bool = False,
        oauth2_introspection_url: str | None = None,
        auth_delay: bool = True,
    ) -> None:
        self.root = Path(root).absolute()
        if _UNSAFE_PATH.search(str(self.root)):
            raise ValueError(
                f"{self.root}: Dovecot's config and userdb syntax cannot carry whitespace, "
                "quotes, '%', '#', '$' or brackets in paths; choose a plainer directory"
            )
        if len(str(self.base_dir)) > _MAX_BASE_DIR_LEN:
            raise ValueError(
                f"{self.root}: path too long for Dovecot's unix sockets under it "
                f"(at most {_MAX_BASE_DIR_LEN - 4} characters)"
            )
        if isinstance(cert_names, str):
            cert_names = (cert_names,)
        if hide_capabilities:
            if imap_capability is not None:
                raise ValueError("give imap_capability or hide_capabilities, not both")
            hidden = {c.upper() for c in hide_capabilities}
            imap_capability = " ".join(c for c in DOVECOT_CAPABILITY.split() if c.upper() not in hidden)
        self.imap_capability = imap_capability
        self.max_connections = max_connections
        self.cert_names: tuple[str, ...] = tuple(cert_names)
        self.extra_config = extra_config
        self.compress = compress
        self.oauth2_introspection_url = oauth2_introspection_url
        self.auth_delay = auth_delay
        self.port: int = 0
        self.imaps_port: int = 0
        self._identity = _current_identity()
        self._users: dict[str, str] = {}
        self._pid: int | None = None
        self._stdio_offset = 0
        self._atexit_registered = False
        # Names the instance in process titles and in doveadm's instance list;
        # derived from root so that two instances never share it.
        self.instance_name = "mirrord-" + hashlib.sha256(str(self.root).encode()).hexdigest()[:8]

    # -- layout ------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_path(self) -> Path:
        """Dovecot's own log: logins, errors, disconnect reasons."""
        return self.root / "logs" / "dovecot.log"

    @property
    def stdio_path(self) -> Path:
        """Where the master's stdout/stderr go: startup errors land here."""
        return self.root / "logs" / "master-stdio.log"

    @property
    def passwd_dir(self) -> Path:
        """One passwd-file per user: see :meth:`add_user` for why not one for all."""
        return self.root / "passwd.d"

    @property
    def homes_dir(self) -> Path:
        return self.root / "home"

    @property
    def ca_file(self) -> Path:
        """PEM certificate of the throwaway CA: what clients should trust."""
        return self.root / "tls" / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.root / "tls" / "ca.key"

    @property
    def cert_file(self) -> Path:
        return self.root / "tls" / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.root / "tls" / "server.key"

    @property
    def mail_uid(self) -> int:
        """The uid that owns every mail file, as Dovecot's mail processes run as it."""
        return self._identity.uid

    @property
    def mail_gid(self) -> int:
        return self._identity.gid

    @property
    def pid(self) -> int | None:
        """The running master's pid, or None when it is not running."""
        return self._running_pid()

    @property
    def running(self) -> bool:
        return self._running_pid() is not None

    @property
    def users(self) -> Mapping[str, str]:
        """Every user added so far and its password."""
        return dict(self._users)

    def home(self, user: str | None = None) -> Path:
        return self.homes_dir / (user or self.user)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<PrivateDovecot {self.host}:{self.port}/{self.imaps_port} at {self.root} ({state})>"

    # -- lifecycle -----------------------------------------------------------

    @staticmethod
    def available() -> bool:
        return os.access(DOVECOT, os.X_OK)

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and return once both ports answer.

        The first start picks free ports; should another process grab one
        before Dovecot binds it, start again on new ones rather than fail.
        """
        if not self.available():
            raise DovecotMissing(
                f"{DOVECOT} not found: install Dovecot with "
                "`apt-get install dovecot-imapd` to run mirrord's integration tests"
            )
        if self.running:
            raise DovecotError(f"{self!r} is already running")
        self._prepare()
        pick_ports = self.port == 0
        attempts = 5 if pick_ports else 1
        for attempt in range(attempts):
            if pick_ports:
                self.port = _free_port()
                self.imaps_port = _free_port()
                while self.imaps_port == self.port:
                    self.imaps_port = _free_port()
            self._write_config()
            rc = self._launch()
            if rc == 0:
                break
            startup = self._stdio_since_launch()
            if "Address already in use" in startup and attempt + 1 < attempts:
                continue
            raise DovecotError(
                f"{DOVECOT} -c {self.config_path} exited with status {rc}:\n"
                f"{startup.strip() or self.log_tail()}"
            )
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            # Whatever went wrong, do not leave a half-started master behind.
            self.stop()
            raise
        if not self._atexit_registered:
            # A crashed test run must not leave Dovecot masters behind.
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the master (SIGTERM, then SIGKILL after ``timeout``) and wait for it to go.

        The pid comes from ``master.pid`` and is signalled only if that
        process's command line still names our config file: a stale pid file
        may name a process that has nothing to do with us.
        """
        pid = self._running_pid()
        if pid is None:
            self._pid = None
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while self._is_our_master(pid):
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 5.0
                while self._is_our_master(pid):
                    if time.monotonic() > deadline:
                        raise DovecotError(f"Dovecot master {pid} survived SIGKILL")
                    time.sleep(0.02)
                break
            time.sleep(0.02)
        self._pid = None

    def __enter__(self) -> PrivateDovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except Exception:
            pass

    def _running_pid(self) -> int | None:
        candidates: list[int] = []
        try:
            candidates.append(int((self.base_dir / "master.pid").read_text().strip()))
        except (OSError, ValueError):
            pass
        if self._pid is not None:
            candidates.append(self._pid)
        for pid in candidates:
            if self._is_our_master(pid):
                return pid
        return None

    def _is_our_master(self, pid: int) -> bool:
        """True while ``pid`` is a live Dovecot master started with our config.

        A zombie has an empty command line, so one that nobody reaps (as
        happens under a container's init) counts as gone.
        """
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return argv[0].endswith(b"dovecot") and str(self.config_path).encode() in argv[1:]

    def _prepare(self) -> None:
        """Create everything under root that Dovecot needs before it starts."""
        ident = self._identity
        self.root.mkdir(parents=True, exist_ok=True)
        if ident.as_root:
            self._open_path_for_mail_user()
        for d in (self.root / "logs", self.state_dir, self.homes_dir):
            d.mkdir(mode=0o755, exist_ok=True)
        if not (self.ca_file.exists() and self.key_file.exists() and self.cert_file.exists()):
            _write_certificates(self.ca_file.parent, self.cert_names)
        if self.user not in self._users:
            self.add_user(self.user, self.password)

    def _open_path_for_mail_user(self) -> None:
        """Make sure ``nobody`` can pass through every directory down to root.

        Started by root, Dovecot's auth, login and mail processes run as
        ``nobody`` and open files under root by absolute path. Directories
        from mkdtemp() are mode 0700, so a root inside one would be
        unreachable: such directories (ours, under the system temp dir) get
        search permission for others, not read. Anything else is left alone
        and reported, as is pytest's ``pytest-of-USER``, whose mode every
        pytest run resets to 0700 as it starts, which would break a running
        server at random.
        """
        ident = self._identity
        temp_root = Path(tempfile.gettempdir()).resolve()
        for directory in [*reversed(self.root.parents), self.root]:
            if _searchable_by(directory, ident.uid, ident.gid):
                continue
            st = directory.stat()
            ours = st.st_uid == os.geteuid() and temp_root in directory.resolve().parents
            if directory == self.root or (ours and not directory.name.startswith("pytest-of-")):
                os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
                continue
            raise DovecotError(
                f"{directory} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}) "
                f"is not searchable by {ident.user!r}, which Dovecot's processes run as when "
                f"started by root, so they could not reach {self.root}. Put the server's root "
                "in a directory of its own under the system temp dir (tempfile.mkdtemp() is "
                "fine; pytest's tmp_path is not, when running as root), or grant o+x."
            )

    def _write_config(self) -> None:
        ident = self._identity
        capability = ""
        if self.imap_capability is not None:
            capability = f"imap_capability = {self.imap_capability}\n"
        root_only = ""
        if ident.as_root:
            root_only = f"first_valid_uid = {min(ident.uid, 500)}\nfirst_valid_gid = {min(ident.gid, 1)}\n"
        config = f"""\
# Written by mirrord.testing.PrivateDovecot; rewritten on every start.
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
listen = {self.host}
protocols = imap
shutdown_clients = yes

default_login_user = {ident.user}
default_internal_user = {ident.user}
default_internal_group = {ident.group}
{root_only}
ssl = yes
ssl_cert = <{self.cert_file}
ssl_key = <{self.key_file}
disable_plaintext_auth = no
auth_mechanisms = plain login{" oauthbearer xoauth2" if self.oauth2_introspection_url else ""}
auth_verbose = yes
{self._nodelay_passdb()}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
{"  mechanisms = plain login" if self.oauth2_introspection_url else ""}
}}
{self._oauth2_passdb()}userdb {{
  driver = static
  args = uid={ident.uid} gid={ident.gid} home={self.homes_dir}/%u
}}

mail_location = maildir:~/Maildir
mailbox_list_index = yes
# A throwaway server: durability costs test time and buys nothing.
mail_fsync = never
namespace inbox {{
  inbox = yes
  separator = /
}}

protocol imap {{
  mail_max_userip_connections = {self.max_connections}
{"  mail_plugins = $mail_plugins imap_zlib" if self.compress else ""}
}}
{capability}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
# Mail processes run as the unprivileged user and must reach these sockets.
service auth {{
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}

{self.extra_config}
"""
        _write_file(self.config_path, config.encode(), 0o644)

    def _nodelay_passdb(self) -> str:
        """With ``auth_delay=False``: a first passdb that lifts the failure delay and penalty for loopback."""
        if self.auth_delay:
            return ""
        table = self.root / "nodelay.passdb"
        _write_file(table, b"127.0.0.1:::::::nodelay=yes\n", 0o644)
        # Dovecot 2.3's recipe (Upgrading.2.3, "Localhost Auth Penalty"):
        # matched by the client's address, it authenticates nobody.
        return f"""passdb {{
  driver = passwd-file
  args = username_format=%{{rip}} {table}
  default_fields = noauthenticate=y
}}
"""

    def _oauth2_passdb(self) -> str:
        """The oauth2 passdb block, with its settings file written next to the config; or nothing."""
        if not self.oauth2_introspection_url:
            return ""
        settings = self.root / "dovecot-oauth2.conf.ext"
        _write_file(
            settings,
            (
                "introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "force_introspection = yes\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n"
            ).encode(),
            0o644,
        )
        return f"""passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {settings}
}}
"""

    def _launch(self) -> int:
        """Run ``dovecot -c CONF``, which daemonizes, and return its exit status.

        The daemon inherits stdout and stderr, so they go to a file: through
        a pipe, the reader would wait for an EOF that comes only when the
        server stops.
        """
        with open(self.stdio_path, "ab") as out:
            self._stdio_offset = out.tell()
            proc = subprocess.run(
                [str(DOVECOT), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=_dovecot_env(),
                start_new_session=True,
                timeout=30,
            )
        return proc.returncode

    def _stdio_since_launch(self) -> str:
        try:
            with open(self.stdio_path, "rb") as f:
                f.seek(self._stdio_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _wait_until_ready(self, timeout: float) -> None:
        """Wait until a greeting comes on the plain port and a TLS greeting on the other.

        The master binds its listeners before it daemonizes, so a bare TCP
        connect proves little; the greeting shows a login process is up, and
        the TLS handshake that the certificate is in place.
        """
        deadline = time.monotonic() + timeout
        # Check the chain but not the name: a test may deliberately issue the
        # certificate for some other name.
        context = self.ssl_context()
        context.check_hostname = False
        last_error: Exception | None = None
        seen_pid = False
        while time.monotonic() < deadline:
            pid = self._running_pid()
            if pid is None:
                # The launcher returns before the daemon has written its pid
                # file; only a master that was there and went is a failure.
                if seen_pid or "Fatal:" in self._stdio_since_launch():
                    raise DovecotError(f"Dovecot master exited during startup; its log ends:\n{self.log_tail()}")
                time.sleep(0.01)
                continue
            seen_pid = True
            self._pid = pid
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as s:
                    greeting = s.makefile("rb").readline()
                    if not greeting.startswith(b"* OK"):
                        raise DovecotError(f"unexpected greeting on port {self.port}: {greeting!r}")
                with socket.create_connection((self.host, self.imaps_port), timeout=2) as raw:
                    with context.wrap_socket(raw, server_hostname=self.cert_names[0]) as s:
                        greeting = s.makefile("rb").readline()
                        if not greeting.startswith(b"* OK"):
                            raise DovecotError(
                                f"unexpected greeting on port {self.imaps_port}: {greeting!r}"
                            )
                return
            except ssl.SSLCertVerificationError as e:
                raise DovecotError(f"TLS on port {self.imaps_port} does not verify against {self.ca_file}: {e}") from e
            except OSError as e:
                last_error = e
                time.sleep(0.02)
        raise DovecotError(
            f"Dovecot did not answer on {self.host}:{self.port} and :{self.imaps_port} "
            f"within {timeout:.0f} s (last error: {last_error}); its log ends:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The end of Dovecot's log and of the master's stdio, for error messages."""
        parts = []
        for path in (self.log_path, self.stdio_path):
            try:
                text = path.read_text("utf-8", "replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            if tail:
                parts.append(f"--- {path} ---\n{tail}")
        return "\n".join(parts) or "(no log output)"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this server's CA, hostname checks on."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- users -------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a login, with an empty mail home of its own; usable at once, no reload.

        Each user gets a passwd-file of its own. Dovecot checks a shared file
        for changes at most once a second, so a user added within a second
        of the last login would be "unknown"; a file named after the user is
        opened at that user's first login.
        """
        if not _USER_NAME.fullmatch(name):
            raise ValueError(f"user name {name!r} must match {_USER_NAME.pattern}")
        if any(c in password for c in ":\r\n\0"):
            raise ValueError("a passwd-file password cannot contain ':', NUL or line breaks")
        if name in self._users:
            raise ValueError(f"user {name!r} already exists")
        ident = self._identity
        self.root.mkdir(parents=True, exist_ok=True)
        self.homes_dir.mkdir(mode=0o755, exist_ok=True)
        home = self.home(name)
        home.mkdir(mode=0o700, exist_ok=True)
        if ident.as_root:
            os.chown(home, ident.uid, ident.gid)
        self.passwd_dir.mkdir(mode=0o755, exist_ok=True)
        passwd = self.passwd_dir / name
        # The auth process runs as the internal user and must read the file.
        _write_file(passwd, f"{name}:{{PLAIN}}{password}\n".encode(), 0o640 if ident.as_root else 0o600)
        if ident.as_root:
            os.chown(passwd, 0, ident.gid)
        self._users[name] = password

    _account_serial = itertools.count(1)

    def new_account(self, hint: str = "user") -> ImapAccount:
        """Add a user with a fresh, unique name and return everything a test needs for it.

        ``hint`` (a test's name, say) becomes part of the user name so that
        Dovecot's log says which test a session belongs to.
        """
        stem = re.sub(r"[^A-Za-z0-9]+", "-", hint).strip("-")[:40] or "user"
        name = f"{stem}-{next(self._account_serial)}"
        password = f"secret {name}"
        self.add_user(name, password)
        return ImapAccount(
            user=name,
            password=password,
            host=self.host,
            port=self.port,
            imaps_port=self.imaps_port,
            ca_file=self.ca_file,
            client=self.client(name),
            dovecot=self,
        )

    def client(self, user: str | None = None) -> ImapClient:
        """An :class:`ImapClient` logged in (lazily) as ``user`` over the plain port."""
        user = user or self.user
        try:
            password = self._users[user]
        except KeyError:
            raise KeyError(f"no such user {user!r}; add it with add_user()") from None
        if not self.port:
            raise DovecotError("start the server before asking for a client")
        return ImapClient(self.host, self.port, user, password)

    # -- doveadm and bulk fill ---------------------------------------------

    def doveadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``doveadm -c CONF ARGS...`` against this instance (``kick``, ``index``, ...)."""
        proc = subprocess.run(
            [str(DOVEADM), "-c", str(self.config_path), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_dovecot_env(),
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise DovecotError(
                f"doveadm {' '.join(args)} failed with status {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def fill(
        self,
        mailbox: str,
        messages: Iterable[bytes],
        user: str | None = None,
        *,
        flags: Iterable[str] = (),
    ) -> int:
        """Put many messages into ``mailbox`` fast, by writing the Maildir directly.

        APPEND costs a round trip per message; writing files and letting
        ``doveadm index`` pick them up is quicker for large mailboxes. UIDs
        follow the order of ``messages``. ``flags`` (system flags only) apply to
        all of them. Returns how many messages were written.
        """
        user = user or self.user
        if user not in self._users:
            raise KeyError(f"no such user {user!r}")
        if isinstance(flags, str):
            flags = (flags,)
        letters = []
        for flag in flags:
            try:
                letters.append(_SYSTEM_FLAG_LETTERS[flag])
            except KeyError:
                raise ValueError(f"fill() takes system flags only, not {flag!r}") from None
        info = ":2," + "".join(sorted(set(letters))) if letters else ""
        if mailbox.upper() != "INBOX":
            created = self.doveadm("mailbox", "create", "-u", user, mailbox, check=False)
            if created.returncode != 0 and "exists" not in created.stderr:
                raise DovecotError(f"doveadm mailbox create {mailbox!r}: {created.stderr.strip()}")
        maildir = Path(self.doveadm("mailbox", "path", "-u", user, mailbox).stdout.strip())
        ident = self._identity
        for sub in ("", "cur", "new", "tmp"):
            d = maildir / sub
            if not d.exists():
                d.mkdir(mode=0o700)
                if ident.as_root:
                    os.chown(d, ident.uid, ident.gid)
        # Dovecot numbers new files in the order of the time stamp in their
        # names (seconds, then the microseconds after "M"): count up from now.
        start = time.time_ns() // 1000
        host = socket.gethostname().replace("/", "_").replace(":", "_")
        target = maildir / ("cur" if info else "new")
        count = 0
        for count, message in enumerate(messages, 1):
            stamp = start + count
            name = f"{stamp // 1_000_000}.M{stamp % 1_000_000}P{os.getpid()}Q{count}.{host},S={len(message)}"
            tmp = maildir / "tmp" / name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, message)
                if ident.as_root:
                    os.fchown(fd, ident.uid, ident.gid)
            finally:
                os.close(fd)
            os.rename(tmp, target / (name + info))
        self.doveadm("index", "-u", user, mailbox)
        return count


@dataclass
class ImapAccount:
    """One user on a :class:`PrivateDovecot`: what mirrord needs to log in, and a client as that user."""

    user: str
    password: str
    host: str
    port: int
    imaps_port: int
    ca_file: Path
    client: ImapClient
    dovecot: PrivateDovecot = field(repr=False)

    def fill(self, mailbox: str, messages: Iterable[bytes], *, flags: Iterable[str] = ()) -> int:
        return self.dovecot.fill(mailbox, messages, user=self.user, flags=flags)

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------
# Another client on the server
