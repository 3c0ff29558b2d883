"""A throwaway Courier-IMAP on 127.0.0.1, for measuring what a server whose IDLE polls does to mirrord.

Stock Courier's IDLE looks at the mailbox when IDLE starts and ends and then
once a minute (``IMAP_IDLE_TIMEOUT``); with ``IMAP_ENHANCEDIDLE=1`` it pushes
(through gamin). mirrord notices the first (see ``mirrord.watcher``); this
starts one to measure it against.

Courier cannot be apt-installed next to Dovecot (both provide imap-server),
so it is used unpacked: ``apt-get install courier-base courier-authdaemon
courier-authlib-userdb`` (no conflict), then ``apt-get download
courier-imap`` and ``dpkg-deb -x courier-imap_*.deb PREFIX``; ``PREFIX`` is
:data:`COURIER_PREFIX` (``MIRRORD_COURIER_PREFIX`` in the environment). It
runs only as root: Courier's paths ``/etc/courier`` and
``/run/courier/authdaemon`` are compiled in, so the server runs in a mount
namespace of its own (``unshare --mount``) with private copies bind-mounted
over them; nothing outside ``root`` is written. One user, plain IMAP only
(LOGIN, no TLS): tests reach it as ``tls: none`` on loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from mirrord.testing._errors import DovecotError

COURIER_PREFIX = Path(os.environ.get("MIRRORD_COURIER_PREFIX", "/work/courier-pkgs/root"))
"""Where courier-imap's package is unpacked (``dpkg-deb -x``); ``/`` if it is installed."""

_SCRIPT = """\
set -e
mount --bind {etc} /etc/courier
mount --bind {authvar} /run/courier/authdaemon
cd {root}
/usr/sbin/authdaemond start
i=0
while [ ! -S {authvar}/socket ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
exec env -i PATH=/usr/bin:/bin \\
  IMAP_CAPABILITY="IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES SORT QUOTA IDLE" \\
  IMAP_IDLE_TIMEOUT=60 IMAP_ENHANCEDIDLE={enhanced} IMAP_USELOCKS=1 IMAP_KEYWORDS=1 IMAP_ACL=1 \\
  IMAP_TRASHFOLDERNAME=Trash IMAP_UMASK=022 IMAP_MAILBOX_SANITY_CHECK=1 MAILDIRPATH=Maildir \\
  /usr/sbin/couriertcpd -address=127.0.0.1 -maxprocs=40 -maxperip=20 -nodnslookup -noidentlookup \\
    -stderr={root}/stderr.log {port} {prefix}/usr/lib/courier/courier/imaplogin {prefix}/usr/bin/imapd Maildir
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateCourier:
    """Courier-IMAP under ``root``, one user (``user``/``password``), plain IMAP on ``port``."""

    host = "127.0.0.1"
    user = "courieruser"
    password = "courier-secret"

    def __init__(self, root: Path, *, enhanced_idle: bool = False) -> None:
        self.root = Path(root).absolute()
        self.enhanced_idle = enhanced_idle
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None if a private Courier can run here, else why not."""
        if os.geteuid() != 0:
            return "a private Courier runs only as root (it needs a mount namespace)"
        if not (COURIER_PREFIX / "usr/bin/imapd").exists():
            return (f"courier-imap is not unpacked at {COURIER_PREFIX} (apt-get download courier-imap;"
                    " dpkg-deb -x; or set MIRRORD_COURIER_PREFIX)")
        for tool in ("/usr/sbin/couriertcpd", "/usr/sbin/authdaemond", "/usr/sbin/userdb", "/usr/bin/unshare"):
            if not os.access(tool, os.X_OK):
                return f"{tool} is missing (apt-get install courier-base courier-authdaemon courier-authlib-userdb)"
        return None

    @property
    def home(self) -> Path:
        return self.root / "home" / self.user

    @property
    def maildir(self) -> Path:
        return self.home / "Maildir"

    def start(self, timeout: float = 15.0) -> None:
        why = self.available()
        if why is not None:
            raise DovecotError(why)
        etc, authvar = self.root / "etc", self.root / "authvar"
        etc.mkdir(parents=True, exist_ok=True)
        authvar.mkdir(exist_ok=True)
        subprocess.run(["cp", "-a", "/etc/courier/.", str(etc)], check=True)
        for name in ("imapd", "imapd-ssl"):
            (etc / name).write_bytes((COURIER_PREFIX / "etc/courier" / name).read_bytes())
        rc = (etc / "authdaemonrc").read_text().splitlines()
        rc = [line for line in rc if not line.startswith("authmodulelist=")] + ['authmodulelist="authuserdb"']
        (etc / "authdaemonrc").write_text("\n".join(rc) + "\n")
        subprocess.run(["chown", "courier:courier", str(authvar)], check=True)
        os.chmod(authvar, 0o750)
        if not self.maildir.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            subprocess.run(["maildirmake", str(self.maildir)], check=True)
            subprocess.run(["chown", "-R", "nobody:nogroup", str(self.home)], check=True)
        # userdb's tools write /etc/courier/userdb*: run them in the namespace too.
        userdb = (
            f"mount --bind {etc} /etc/courier && "
            f"userdb {self.user} set uid=65534 gid=65534 home={self.home} mail={self.maildir} && "
            f"echo '{self.password}' | userdbpw | userdb {self.user} set systempw && makeuserdb"
        )
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", userdb], check=True)
        self.port = _free_port()
        script = self.root / "run.sh"
        script.write_text(_SCRIPT.format(
            etc=etc, authvar=authvar, root=self.root, port=self.port, prefix=COURIER_PREFIX,
            enhanced=1 if self.enhanced_idle else 0,
        ))
        self._process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", str(script)],
            stdin=subprocess.DEVNULL,
            stdout=open(self.root / "stdout.log", "wb"),  # noqa: SIM115 - the child keeps it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"* OK"):
                        return
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DovecotError(f"Courier did not start: {(self.root / 'stdout.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server and its authdaemon, each by the process id it was started with."""
        if self._process is not None:
            if self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGTERM)
                try:
                    self._process.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self._process.pid, signal.SIGKILL)
                    self._process.wait()
            self._process = None
        pid_file = self.root / "authvar" / "pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
            pid_file.unlink(missing_ok=True)

    def __enter__(self) -> PrivateCourier:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
