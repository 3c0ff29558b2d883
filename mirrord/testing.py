"""Test support: a throwaway Dovecot on loopback, and realistic mail to put in it.

mirrord is only as good as its agreement with a real server, so its tests,
its benchmarks and ``mirrord demo`` all talk to a real Dovecot rather than to a
fake. :class:`PrivateDovecot` starts one under a directory of its own, on free
loopback ports, with a throwaway CA so that TLS can be verified the way
mirrord verifies it in production. :class:`ImapClient` plays *another* mail
client on that server (the one that delivers, flags and expunges while mirrord
watches), and :func:`make_message` / :func:`sample_mailboxes` produce mail that
looks like mail.

Nothing here is needed at run time; it lives in the package (like
``treq.testing``) so that the tests of code built on mirrord can use it too.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import datetime as _dt
import email.utils
import grp
import hashlib
import imaplib
import ipaddress
import itertools
import os
import pwd
import random
import re
import select
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.header import Header
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

__all__ = [
    "DOVECOT",
    "DOVEADM",
    "DovecotError",
    "DovecotMissing",
    "ImapAccount",
    "ImapClient",
    "ImapCommandError",
    "PrivateDovecot",
    "ROOT_MAIL_USER",
    "SampleMessage",
    "decode_mailbox",
    "encode_mailbox",
    "make_message",
    "populate",
    "sample_mailboxes",
]

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


class DovecotError(RuntimeError):
    """The private Dovecot could not be set up, started or driven."""


class DovecotMissing(DovecotError):
    """Dovecot is not installed, so integration tests cannot run here."""


class ImapCommandError(DovecotError):
    """The server answered NO or BAD to a command sent by :class:`ImapClient`."""


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
    ``extra_config`` comes last in the config, so it can also override
    anything above it.
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
auth_mechanisms = plain login
auth_verbose = yes

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
}}
userdb {{
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


def encode_mailbox(name: str) -> str:
    """Spell a UTF-8 mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3)."""
    import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec)

    return name.encode("imap4-utf-7").decode("ascii")


def decode_mailbox(name: bytes) -> str:
    import twisted.mail.imap4  # noqa: F401

    return name.decode("imap4-utf-7")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _uid_set(uids: int | Iterable[int]) -> str:
    """Compress UIDs into ranges, so that thousands of them fit on one command line."""
    from mirrord.protocol.client import uid_set

    return uid_set((uids,) if isinstance(uids, int) else uids).decode("ascii")


def _flag_list(flags: Iterable[str]) -> str:
    if isinstance(flags, str):
        flags = (flags,)
    return "(" + " ".join(flags) + ")"


_FETCH_START = re.compile(rb"\d+ \(")
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")


def _fetch_records(data: list[bytes | tuple[bytes, bytes] | None]) -> list[tuple[bytes, bytes | None]]:
    """Regroup imaplib's FETCH data into (response text, literal) per message.

    imaplib hands back a flat list: a tuple for each part that ended in a
    literal, bytes for the text after it; and whatever else the server
    volunteered (a flag change by another session) as more bytes.
    """
    records: list[tuple[bytes, bytes | None]] = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            head, literal = item
            if records and not _FETCH_START.match(head):
                text, previous = records[-1]
                records[-1] = (text + head, previous if previous is not None else literal)
            else:
                records.append((head, literal))
        elif _FETCH_START.match(item) or not records:
            records.append((item, None))
        else:
            text, body = records[-1]
            records[-1] = (text + item, body)
    return records


def _parse_flags(text: bytes) -> frozenset[str]:
    match = _FETCH_FLAGS.search(text)
    if not match:
        return frozenset()
    # \Recent belongs to a session, not to the message; a mirror cannot hold it.
    return frozenset(f for f in match.group(1).decode("ascii").split() if f != "\\Recent")


class ImapClient:
    """Another mail client on the server: delivers, flags and expunges while mirrord watches.

    Built on stdlib :mod:`imaplib` so that it shares no code with the
    Twisted protocol code under test. It holds one connection, opened at
    first use and closed by :meth:`close`; tests that count connections
    against ``mail_max_userip_connections`` should close it first. Every
    call selects its mailbox afresh, so it always sees the current state.
    Mailbox names are ordinary (UTF-8) strings with ``/`` as the hierarchy
    separator. Not thread-safe.
    """

    def __init__(self, host: str, port: int, user: str, password: str, *, timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.timeout = timeout
        self._conn: imaplib.IMAP4 | None = None
        self._last_used = 0.0

    def __repr__(self) -> str:
        return f"<ImapClient {self.user}@{self.host}:{self.port}>"

    def __enter__(self) -> ImapClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.logout()
        except (imaplib.IMAP4.error, OSError):
            try:
                conn.shutdown()
            except OSError:
                pass

    # -- connection --------------------------------------------------------

    def _connection(self) -> imaplib.IMAP4:
        conn = self._conn
        if conn is not None and self._hung_up(conn):
            self._drop()
            conn = None
        if conn is not None and time.monotonic() - self._last_used > 20:
            # The server may have logged an idle session out, or been restarted.
            try:
                conn.noop()
            except (imaplib.IMAP4.error, OSError):
                self._drop()
                conn = None
        if conn is None:
            conn = imaplib.IMAP4(self.host, self.port, timeout=self.timeout)
            try:
                # AUTHENTICATE PLAIN carries any password, UTF-8 included,
                # with no quoting rules to get wrong.
                credentials = f"\0{self.user}\0{self.password}".encode()
                conn.authenticate("PLAIN", lambda _challenge: credentials)
            except BaseException:
                conn.shutdown()
                raise
            self._conn = conn
        self._last_used = time.monotonic()
        return conn

    @staticmethod
    def _hung_up(conn: imaplib.IMAP4) -> bool:
        """True if the server spoke while we were silent: that is a BYE, or EOF.

        Between commands, with no IDLE, Dovecot sends nothing else; a test
        that kicked the user or restarted the server should get a new
        connection, not an error from the old one.
        """
        try:
            readable, _, _ = select.select([conn.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _read(self, call: Callable[[], T]) -> T:
        """Run a read-only operation, once more on a new connection if the old one broke.

        Only for commands that change nothing: a write that broke may or may
        not have happened, and only the caller can tell.
        """
        try:
            return call()
        except (imaplib.IMAP4.abort, OSError):
            self._drop()
            return call()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.shutdown()
            except OSError:
                pass

    def _run(self, what: str, call: Callable[..., tuple[str, list[Any]]], *args: object) -> list[Any]:
        """Call an imaplib method; raise on NO/BAD; drop a connection that broke."""
        try:
            typ, data = call(*args)
        except imaplib.IMAP4.abort:
            self._drop()
            raise
        except imaplib.IMAP4.error as e:
            raise ImapCommandError(f"{what}: {e}") from e
        except OSError:
            self._drop()
            raise
        if typ != "OK":
            text = b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace")
            raise ImapCommandError(f"{what}: {typ} {text}")
        return list(data)

    def _select(self, mailbox: str, readonly: bool) -> tuple[imaplib.IMAP4, int]:
        conn = self._connection()
        data = self._run(
            f"{'EXAMINE' if readonly else 'SELECT'} {mailbox!r}",
            conn.select,
            _quote(encode_mailbox(mailbox)),
            readonly,
        )
        return conn, int(data[0] or 0)

    def _unselect(self, conn: imaplib.IMAP4) -> None:
        if conn.state == "SELECTED":
            self._run("UNSELECT", conn.unselect)

    # -- mailboxes ---------------------------------------------------------

    def create(self, mailbox: str, *, exist_ok: bool = True) -> None:
        """Create ``mailbox`` (and any missing parents: ``Archive/2024`` makes ``Archive``)."""
        conn = self._connection()
        try:
            self._run(f"CREATE {mailbox!r}", conn.create, _quote(encode_mailbox(mailbox)))
        except ImapCommandError as e:
            if not (exist_ok and "ALREADYEXISTS" in str(e)):
                raise

    def delete(self, mailbox: str) -> None:
        conn = self._connection()
        self._unselect(conn)
        self._run(f"DELETE {mailbox!r}", conn.delete, _quote(encode_mailbox(mailbox)))

    def mailboxes(self) -> list[str]:
        """Every mailbox name the server lists, decoded to UTF-8, in server order."""
        data = self._read(lambda: self._run("LIST", self._connection().list, '""', '"*"'))
        names = []
        for item in data:
            if item is None:
                continue
            if isinstance(item, tuple):
                names.append(decode_mailbox(item[1]))
                continue
            match = re.fullmatch(rb'\((?:[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (.*)', item)
            if not match:
                raise ImapCommandError(f"LIST: cannot parse {item!r}")
            raw = match.group(1)
            if raw.startswith(b'"'):
                raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
            names.append(decode_mailbox(raw))
        return names

    def status(self, mailbox: str) -> dict[str, int]:
        """STATUS MESSAGES UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ, as a dict."""
        items = "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)"
        data = self._read(
            lambda: self._run(
                f"STATUS {mailbox!r}", self._connection().status, _quote(encode_mailbox(mailbox)), items
            )
        )
        # The item list is the last parenthesised group; the mailbox name
        # before it may itself look like "NAME 12".
        last = data[-1]
        text = last if isinstance(last, bytes) else b""
        items_text = text[text.rfind(b"(") :]
        return {k.decode(): int(v) for k, v in re.findall(rb"([A-Z]+) (\d+)", items_text)}

    def uidvalidity(self, mailbox: str) -> int:
        return self.status(mailbox)["UIDVALIDITY"]

    # -- messages ----------------------------------------------------------

    def append(
        self,
        mailbox: str,
        message: bytes,
        flags: Iterable[str] = (),
        *,
        internal_date: _dt.datetime | None = None,
    ) -> int:
        """APPEND ``message`` byte for byte and return its UID (from UIDPLUS's APPENDUID).

        imaplib's own append() rewrites bare CR and LF to CRLF; a test of
        byte-exact mirroring needs the bytes it gave to be the bytes stored,
        so the literal is handed to imaplib directly.
        """
        conn = self._connection()
        self._unselect(conn)
        date = imaplib.Time2Internaldate(internal_date) if internal_date is not None else None
        conn.literal = message  # type: ignore[assignment]  # typeshed says str; imaplib sends bytes as is
        data = self._run(
            f"APPEND {mailbox!r}",
            conn._simple_command,
            "APPEND",
            _quote(encode_mailbox(mailbox)),
            _flag_list(flags),
            date,
        )
        for item in data:
            if isinstance(item, bytes) and (match := _APPENDUID.search(item)):
                return int(match.group(2))
        raise ImapCommandError(f"APPEND {mailbox!r}: no APPENDUID in {data!r}")

    def _store(self, mailbox: str, uids: int | Iterable[int], how: str, flags: Iterable[str]) -> None:
        conn, _ = self._select(mailbox, readonly=False)
        self._run(
            f"UID STORE {how} {mailbox!r}",
            conn.uid,
            "STORE",
            _uid_set(uids),
            how,
            _flag_list(flags),
        )

    def set_flags(self, mailbox: str, uid: int | Iterable[int], flags: Iterable[str]) -> None:
        """Replace the flags of the message(s) with ``flags``."""
        self._store(mailbox, uid, "FLAGS.SILENT", flags)

    def add_flags(self, mailbox: str, uid: int | Iterable[int], flags: Iterable[str]) -> None:
        self._store(mailbox, uid, "+FLAGS.SILENT", flags)

    def remove_flags(self, mailbox: str, uid: int | Iterable[int], flags: Iterable[str]) -> None:
        self._store(mailbox, uid, "-FLAGS.SILENT", flags)

    def expunge(self, mailbox: str, uids: int | Iterable[int]) -> None:
        """Expunge exactly these UIDs (UID EXPUNGE), leaving other \\Deleted messages alone."""
        uid_set = _uid_set(uids)
        conn, _ = self._select(mailbox, readonly=False)
        self._run(f"UID STORE {mailbox!r}", conn.uid, "STORE", uid_set, "+FLAGS.SILENT", "(\\Deleted)")
        self._run(f"UID EXPUNGE {mailbox!r}", conn.uid, "EXPUNGE", uid_set)

    def uids(self, mailbox: str) -> list[int]:
        return self._read(lambda: self._uids(mailbox))

    def _uids(self, mailbox: str) -> list[int]:
        conn, exists = self._select(mailbox, readonly=True)
        if not exists:
            return []
        data = self._run(f"UID SEARCH {mailbox!r}", conn.uid, "SEARCH", "ALL")
        return sorted(int(u) for item in data if item for u in item.split())

    def flags(self, mailbox: str) -> dict[int, frozenset[str]]:
        """UID -> flags of every message (without the session-bound \\Recent)."""
        return self._read(lambda: self._flags(mailbox))

    def _flags(self, mailbox: str) -> dict[int, frozenset[str]]:
        conn, exists = self._select(mailbox, readonly=True)
        if not exists:
            return {}
        data = self._run(f"UID FETCH FLAGS {mailbox!r}", conn.uid, "FETCH", "1:*", "(UID FLAGS)")
        result = {}
        for text, _ in _fetch_records(data):
            uid = _FETCH_UID.search(text)
            if uid and _FETCH_FLAGS.search(text):
                result[int(uid.group(1))] = _parse_flags(text)
        return result

    def messages(self, mailbox: str) -> dict[int, tuple[frozenset[str], bytes]]:
        """UID -> (flags, BODY[] exactly as the server sends it), without setting \\Seen."""
        return self._read(lambda: self._messages(mailbox))

    def _messages(self, mailbox: str) -> dict[int, tuple[frozenset[str], bytes]]:
        conn, exists = self._select(mailbox, readonly=True)
        if not exists:
            return {}
        data = self._run(
            f"UID FETCH BODY.PEEK[] {mailbox!r}", conn.uid, "FETCH", "1:*", "(UID FLAGS BODY.PEEK[])"
        )
        result = {}
        for text, literal in _fetch_records(data):
            uid = _FETCH_UID.search(text)
            if uid is None or literal is None:
                continue
            result[int(uid.group(1))] = (_parse_flags(text), literal)
        return result


# --------------------------------------------------------------------------
# Mail to put in it

_WORDS = (
    "mirror mailbox server folder message sync daemon local copy update change flag "
    "state connection arrival delivery archive project meeting report draft review "
    "please thanks question answer tomorrow morning afternoon schedule invoice "
    "attached version release notes plan budget team weekly monthly reply forward "
    "the a of to and in for on with is that it as at by this from be are was we you"
).split()
_WORDS_UTF8 = "Grüße Straße Ærøskøbing naïve café Zürich Smørrebrød Привет 東京 Ελλάδα façade São jalapeño".split()
_PEOPLE = (
    ("Alice Example", "alice@example.org"),
    ("Bjørn Ødegård", "bjorn@example.net"),
    ("Chloé Durand", "chloe@example.fr"),
    ("Dmitri Петров", "dmitri@example.ru"),
    ("Eve Mallory", "eve@example.com"),
    ("Fumiko 山田", "fumiko@example.jp"),
    ("Günter Schütz", "guenter@example.de"),
)
_RECIPIENT = ("Mirror Test", "mirror@example.test")
_EPOCH = _dt.datetime(2024, 1, 2, 9, 0, tzinfo=_dt.timezone.utc)


def _header(name: str, value: str) -> bytes:
    """One header field, RFC 2047-encoded and folded when it is not plain ASCII."""
    if value.isascii():
        return f"{name}: {value}\r\n".encode("ascii")
    encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}\r\n".encode("ascii")


def _add_paragraphs(rng: random.Random, lines: list[str], size: int) -> None:
    """Append paragraphs of about ``size`` bytes of text wrapped at 72 columns.

    Built word by word rather than with textwrap: bulk fills make thousands
    of messages, and textwrap made generating them slower than Dovecot
    storing them.
    """
    added = 0
    while added < size:
        # Words average about six characters with their space: cut the last
        # paragraph short rather than overshoot.
        count = min(rng.randint(20, 90), max(3, (size - added) // 6))
        words = rng.choices(_WORDS, k=count)
        for _ in range(len(words) // 12):
            words[rng.randrange(len(words))] = rng.choice(_WORDS_UTF8)
        words[0] = words[0].capitalize()
        words[-1] += "."
        line = words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > 72:
                lines.append(line)
                added += len(line) + 1
                line = word
            else:
                line += " " + word
        lines += [line, ""]
        added += len(line) + 2


def _quoted_printable(text: str) -> bytes:
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True)
    return encoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def make_message(
    i: int,
    *,
    size: int = 2000,
    rng: random.Random | None = None,
    subject: str | None = None,
    attachment_bytes: int = 0,
) -> bytes:
    """A realistic RFC 5322 message with CRLF line ends, the same every time for the same ``i`` and ``rng``.

    multipart/mixed with a quoted-printable UTF-8 text part, the whole
    message about ``size`` bytes, plus (when ``attachment_bytes`` > 0) a
    base64 attachment whose decoded content is exactly that many bytes (so
    the message grows by about 4/3 of it). Non-ASCII where real mail has it:
    display names and subjects as RFC 2047 encoded words, accented and
    non-Latin words in the body. Message-ID and Date follow from ``i`` alone,
    so distinct ``i`` give distinct messages; ``rng`` (by default seeded with
    ``i``) picks everything else.
    """
    rng = rng if rng is not None else random.Random(i)
    sender = _PEOPLE[rng.randrange(len(_PEOPLE))]
    if subject is None:
        topic = " ".join(rng.choice(_WORDS_UTF8 if rng.random() < 0.3 else _WORDS) for _ in range(rng.randint(2, 6)))
        subject = f"Message {i}: {topic}"
    digest = hashlib.sha256(f"mirrord-test-message-{i}".encode()).hexdigest()
    boundary = f"=_mirrord_{i}_{digest[:16]}"
    date = _EPOCH + _dt.timedelta(minutes=17 * i)

    head = b"".join(
        [
            _header("From", email.utils.formataddr(sender, charset="utf-8")),
            _header("To", email.utils.formataddr(_RECIPIENT, charset="utf-8")),
            _header("Subject", subject),
            _header("Date", email.utils.format_datetime(date)),
            _header("Message-ID", f"<{i}.{digest[:20]}@mirrord.test>"),
            _header("X-Mirrord-Test-Index", str(i)),
            b"MIME-Version: 1.0\r\n",
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'.encode("ascii"),
            b"\r\n",
            b"This is a multi-part message in MIME format.\r\n",
            f"\r\n--{boundary}\r\n".encode("ascii"),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
        ]
    )
    closing = f"\r\n--{boundary}--\r\n".encode("ascii")
    want = max(size - len(head) - len(closing), 40)
    lines: list[str] = []
    qp = b""
    while len(qp) < want:
        # Quoted-printable grows this text by a sixth or so: top up by less
        # than the shortfall and converge from below in a few steps.
        _add_paragraphs(rng, lines, max((want - len(qp)) * 4 // 5, 1))
        qp = _quoted_printable("\n".join(lines))
    parts = [head, qp]
    if attachment_bytes > 0:
        payload = base64.b64encode(rng.randbytes(attachment_bytes))
        parts += [
            f"\r\n--{boundary}\r\n".encode("ascii"),
            f'Content-Type: application/octet-stream; name="attachment-{i}.bin"\r\n'.encode("ascii"),
            f'Content-Disposition: attachment; filename="attachment-{i}.bin"\r\n'.encode("ascii"),
            b"Content-Transfer-Encoding: base64\r\n\r\n",
            b"\r\n".join(payload[k : k + 76] for k in range(0, len(payload), 76)),
            b"\r\n",
        ]
    parts.append(closing)
    return b"".join(parts)


class SampleMessage(NamedTuple):
    message: bytes
    flags: frozenset[str]


def sample_mailboxes(rng: random.Random | None = None) -> dict[str, list[SampleMessage]]:
    """A few dozen realistic messages in a few mailboxes, for ``mirrord demo`` and smoke tests.

    An INBOX with some mail read, flagged and answered and a few
    attachments; a read archive one level down (``Archive/2024``); drafts in
    a mailbox whose name needs modified UTF-7 (``Entwürfe``).
    """
    rng = rng if rng is not None else random.Random(2024)
    serial = itertools.count(1)

    def batch(count: int, choose_flags: Callable[[], set[str]], attachment_share: float) -> list[SampleMessage]:
        out = []
        for _ in range(count):
            i = next(serial)
            attachment = rng.randint(8_000, 120_000) if rng.random() < attachment_share else 0
            message = make_message(
                i, size=rng.randint(600, 6000), rng=random.Random(rng.getrandbits(64)), attachment_bytes=attachment
            )
            out.append(SampleMessage(message, frozenset(choose_flags())))
        return out

    def inbox_flags() -> set[str]:
        flags = set()
        if rng.random() < 0.6:
            flags.add("\\Seen")
        if rng.random() < 0.15:
            flags.add("\\Flagged")
        if "\\Seen" in flags and rng.random() < 0.2:
            flags.add("\\Answered")
        if rng.random() < 0.05:
            flags.add("$Forwarded")
        return flags

    def archive_flags() -> set[str]:
        return {"\\Seen", "\\Answered"} if rng.random() < 0.3 else {"\\Seen"}

    return {
        "INBOX": batch(20, inbox_flags, 0.15),
        "Archive/2024": batch(14, archive_flags, 0.2),
        "Entwürfe": batch(4, lambda: {"\\Draft", "\\Seen"}, 0.0),
    }


def populate(client: ImapClient, samples: Mapping[str, Iterable[SampleMessage]]) -> dict[str, list[int]]:
    """APPEND ``samples`` (as from :func:`sample_mailboxes`); return the new UIDs per mailbox."""
    uids: dict[str, list[int]] = {}
    for mailbox, messages in samples.items():
        if mailbox.upper() != "INBOX":
            client.create(mailbox)
        uids[mailbox] = [client.append(mailbox, m.message, m.flags) for m in messages]
    return uids
