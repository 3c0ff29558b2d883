"""The account file: parsed, validated and typed before anything connects.

A daemon that runs for months must refuse a bad config at start, with a
message a person can act on without reading this code: every error names the
file, the line and the dotted key. That is why the file is read with
``yaml.compose`` (nodes keep their line numbers) and checked by hand instead
of ``yaml.safe_load`` plus a schema: a plain dict has forgotten where each
value came from, and silently keeps the last of two duplicate keys.

Nothing here writes to disk or connects anywhere; ``load_config`` only reads
the config file (and checks that ``ca_file`` can be read). Passwords are not
read at load time: ``PasswordSource.resolve`` does that when a connection
needs one, so a locked password store does not stop ``mirrord check`` from
validating the file. An OAuth2 account's ``token_command`` is not run then
either, nor once for the daemon's lifetime: each new connection runs it.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import os
import re
import shlex
import signal
import stat
import subprocess
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, NoReturn, cast, get_args

import platformdirs
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "OAUTH_AUTH_MODES",
    "Account",
    "AuthMode",
    "Config",
    "ConfigError",
    "PasswordError",
    "PasswordSource",
    "TLSMode",
    "default_config_path",
    "default_state_dir",
    "load_config",
]

TLSMode = Literal["implicit", "starttls", "none"]
TLS_MODES: tuple[str, ...] = get_args(TLSMode)
CompressMode = Literal["auto", "yes", "no"]
COMPRESS_MODES: tuple[str, ...] = get_args(CompressMode)
DEFAULT_COMPRESS: CompressMode = "auto"
"""COMPRESS=DEFLATE on worker connections where offered, when the server is reached
over the Internet (not loopback or a private network, where the link outruns the
server's compressor); see mirrord.protocol.connect.wants_compression for the figures."""

SyncMode = Literal["two-way", "pull"]
SYNC_MODES: tuple[str, ...] = get_args(SyncMode)
DEFAULT_SYNC: SyncMode = "two-way"
"""What a reader does to the Maildir reaches the server; ``pull`` keeps a read-only backup."""
LocalDelete = Literal["expunge", "flag", "keep"]
LOCAL_DELETE_MODES: tuple[str, ...] = get_args(LocalDelete)
DEFAULT_LOCAL_DELETE: LocalDelete = "expunge"
AuthMode = Literal["password", "oauth2", "oauthbearer", "xoauth2"]
AUTH_MODES: tuple[str, ...] = get_args(AuthMode)
OAUTH_AUTH_MODES: tuple[str, ...] = ("oauth2", "oauthbearer", "xoauth2")
"""``oauth2``: OAUTHBEARER where the server offers it, else XOAUTH2; the other
two insist on the mechanism they name. All take the token from ``token_command``."""

DEFAULT_PORTS: dict[str, int] = {"implicit": 993, "starttls": 143, "none": 143}
DEFAULT_WORKERS = 4
MAX_WORKERS = 32
DEFAULT_MAILBOXES: tuple[str, ...] = ("*",)
DEFAULT_MAX_CONNECTIONS = 10
"""Dovecot's default per-user-and-address cap (mail_max_userip_connections)."""
DEFAULT_POLL_INTERVAL = 60.0
"""Unwatched mailboxes are polled with one LIST-STATUS (or pipelined STATUS) for all: cheap enough
every minute (see mirrord/poller.py and tests/bench/bench_many.py)."""
DEFAULT_MAX_DELETE = 0.5
DEFAULT_TRASH_DAYS = 7.0
DEFAULT_IDLE_RENEW = 20 * 60.0
"""Under the ~23 minutes after which some providers drop an IDLE, and RFC 2177's 29."""
MAX_IDLE_RENEW = 29 * 60.0
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
PASSWORD_COMMAND_TIMEOUT = 60.0
"""Seconds a password command may take; long enough for a pinentry prompt."""

_APP = "mirrord"

TOP_KEYS = ("state_dir", "accounts")
ACCOUNT_KEYS = (
    "host",
    "port",
    "tls",
    "ca_file",
    "username",
    "auth",
    "token_command",
    "password_command",
    "password_file",
    "password",
    "maildir",
    "mailboxes",
    "exclude",
    "workers",
    "watch",
    "max_connections",
    "poll_interval",
    "idle_renew",
    "on_new_mail",
    "max_delete",
    "trash_days",
    "compress",
    "sync",
    "local_delete",
)
REQUIRED_ACCOUNT_KEYS = ("host", "username", "maildir")
PASSWORD_KEYS = ("password_command", "password_file", "password")

_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_STR = "tag:yaml.org,2002:str"
_TAG_MERGE = "tag:yaml.org,2002:merge"
_SCALAR_TAGS = frozenset({_TAG_NULL, _TAG_BOOL, _TAG_INT, _TAG_FLOAT, _TAG_STR})


_HOME_VARIABLE = re.compile(r"\$(?:HOME\b|\{HOME\})")


def expand_home(argument: str) -> str:
    """``~``, ``~user`` at the start and ``$HOME``/``${HOME}`` anywhere, as a shell would.

    Commands run without a shell, so ``[cat, ~/.mailpass]`` used to hand
    ``cat`` a file literally named ``~/.mailpass``. A person who writes that
    means their home, so it is expanded when the config is read; no other
    variable is (``$`` may be part of an argument, and the service's
    environment is not the shell's).
    """
    if argument.startswith("~"):
        argument = os.path.expanduser(argument)
    if "$" in argument:
        home = os.path.expanduser("~")
        argument = _HOME_VARIABLE.sub(lambda _: home, argument)
    return argument


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(_APP, appauthor=False)) / "config.yaml"


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir(_APP, appauthor=False))


# --------------------------------------------------------------------------
# Errors


class ConfigError(Exception):
    """A config file that cannot be used, with where in it the problem is.

    The parts are kept separately so that callers (``mirrord check``, tests)
    can point at the line or key without parsing the message.
    """

    # Positional parameters (not keyword-only) so the default pickling of
    # exceptions, which calls ``cls(*args)``, rebuilds an equal error.
    def __init__(
        self, path: Path, message: str, line: int | None = None, key: str | None = None
    ) -> None:
        super().__init__(path, message, line, key)
        self.path = path
        self.message = message
        self.line = line
        self.key = key

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


def _missing_files(arguments: Sequence[str]) -> str:
    """Which of a failed command's arguments name a file that is not there, said as a clause.

    The commonest reason ``[cat, ~/.mailpass]`` or ``[gpg, -d, FILE]`` fails
    is a wrong path; the command's own complaint went to its stderr, which
    under systemd is a different line of the journal. Only absolute paths
    are looked at, so ``pass show mail/personal`` names no file.
    """
    missing = [a for a in arguments if a.startswith("/") and not os.path.lexists(a)]
    if not missing:
        return ""
    return f"; no such file: {', '.join(missing)}"


class PasswordError(Exception):
    """A password source failed.

    The message names the account and the source kind (the config key) and
    why; it never carries the secret or anything the command printed, because
    these messages end up in logs.
    """

    def __init__(self, account: str, kind: str, reason: str) -> None:
        super().__init__(account, kind, reason)
        self.account = account
        self.kind = kind
        self.reason = reason

    def __str__(self) -> str:
        return f"account {self.account!r}: {self.kind}: {self.reason}"


# --------------------------------------------------------------------------
# Password sources


@dataclass(frozen=True, repr=False)
class PasswordSource:
    """Where an account's password comes from; exactly one of the three is set.

    ``account`` is here only so that a failure can say whose password it was.
    ``token``: the command is an OAuth2 account's ``token_command``, whose
    output is good for an hour or so; it is run for each new connection
    (see :meth:`resolve_once`), and messages name it as such.
    The repr is written by hand so that an inline secret never shows up in a
    log line or a traceback that prints an ``Account``.
    """

    account: str
    command: tuple[str, ...] | None = None
    file: Path | None = None
    inline: str | None = None
    token: bool = False

    def __post_init__(self) -> None:
        given = [v for v in (self.command, self.file, self.inline) if v is not None]
        if len(given) != 1:
            raise ValueError("a PasswordSource needs exactly one of command, file, inline")
        if self.command is not None and (
            not self.command or not all(isinstance(a, str) and a for a in self.command)
        ):
            raise ValueError("a password command must be a non-empty tuple of non-empty strings")
        if self.token and self.command is None:
            raise ValueError("an OAuth2 token comes from a command")

    @property
    def kind(self) -> str:
        """The config key this source came from; used in messages so users can find it."""
        if self.command is not None:
            return "token_command" if self.token else "password_command"
        if self.file is not None:
            return "password_file"
        return "password"

    def __repr__(self) -> str:
        if self.command is not None:
            detail = f"command={self.command!r}"
        elif self.file is not None:
            detail = f"file={self.file!r}"
        else:
            detail = "inline=<inline password>"
        return f"PasswordSource(account={self.account!r}, {detail})"

    def __str__(self) -> str:
        if self.command is not None:
            return f"{self.kind}: {shlex.join(self.command)}"
        if self.file is not None:
            return f"password_file: {self.file}"
        return "<inline password>"

    def resolve(self, timeout: float = PASSWORD_COMMAND_TIMEOUT) -> str:
        """The password, fetched now.

        This blocks (a command may wait on a pinentry prompt); call it from a
        thread when the reactor is running. Only the trailing newline is
        stripped: leading and trailing spaces may be part of a password.
        """
        if self.command is not None:
            return self._from_command(self.command, timeout)
        if self.file is not None:
            return self._from_file(self.file)
        assert self.inline is not None
        return self.inline

    def resolve_once(self, timeout: float = PASSWORD_COMMAND_TIMEOUT) -> str:
        """What a caller may fetch once and hold for the account's lifetime.

        The password; but for a token source an empty string, without running
        anything: a token expires within the hour, so the session opener runs
        the command itself for every connection (and once more when the server
        refuses the token), and no token outlives the login it was fetched for.
        """
        if self.token:
            return ""
        return self.resolve(timeout)

    def _fail(self, reason: str) -> NoReturn:
        raise PasswordError(self.account, self.kind, reason)

    def _from_command(self, argv: tuple[str, ...], timeout: float) -> str:
        program = argv[0]
        # stderr is inherited, not captured: it is where pass/gpg explain a
        # failure, and it goes to the daemon's stderr (the journal), never
        # into our messages. stdout, which carries the secret, is captured.
        try:
            done = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            self._fail(f"command not found: {program!r}")
        except PermissionError:
            self._fail(f"command is not executable: {program!r}")
        except subprocess.TimeoutExpired:
            self._fail(f"{program!r} did not finish within {timeout:g} s and was killed")
        except OSError as e:
            self._fail(f"cannot run {program!r}: {e.strerror or type(e).__name__}")
        if done.returncode < 0:
            try:
                name = signal.Signals(-done.returncode).name
            except ValueError:
                name = f"signal {-done.returncode}"
            self._fail(f"{program!r} was killed by {name}")
        if done.returncode != 0:
            self._fail(f"{program!r} exited with status {done.returncode}{_missing_files(argv[1:])}")
        return self._first_line(done.stdout, f"{program!r} printed nothing on its first line")

    def _from_file(self, path: Path) -> str:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._fail(f"no such file: {path}")
        except IsADirectoryError:
            self._fail(f"is a directory, not a file: {path}")
        except PermissionError:
            self._fail(f"permission denied reading {path}")
        except OSError as e:
            self._fail(f"cannot read {path}: {e.strerror or type(e).__name__}")
        return self._first_line(data, f"the first line of {path} is empty")

    def _first_line(self, data: bytes, empty_reason: str) -> str:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"the {'token' if self.token else 'password'} is not valid UTF-8")
        line = text.partition("\n")[0]
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            self._fail(empty_reason)
        return line


# --------------------------------------------------------------------------
# Accounts and the config


def _fold_inbox(name: str) -> str:
    """Spell a leading INBOX component as ``INBOX``.

    IMAP treats INBOX case-insensitively, and servers disagree on how they
    spell it in LIST, so both names and patterns are folded before matching.
    """
    first, sep, rest = name.partition("/")
    if first.upper() == "INBOX":
        return "INBOX" + sep + rest
    return name


@dataclass(frozen=True)
class Account:
    name: str
    host: str
    port: int
    tls: TLSMode
    ca_file: Path | None
    username: str
    password: PasswordSource
    """The password, or for an OAuth2 account (``auth``) its token command."""
    maildir: Path
    mailboxes: tuple[str, ...] = DEFAULT_MAILBOXES
    exclude: tuple[str, ...] = ()
    workers: int = DEFAULT_WORKERS
    watch: tuple[str, ...] | None = None
    """Patterns of mailboxes that get IDLE watchers first (then INBOX, then recent arrivals); None: no preference."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    poll_interval: float = DEFAULT_POLL_INTERVAL
    idle_renew: float = DEFAULT_IDLE_RENEW
    on_new_mail: tuple[str, ...] | None = None
    """A command (argv, no shell) run when new mail has landed."""
    max_delete: float = DEFAULT_MAX_DELETE
    """The largest share (0..1) of a mailbox one listing may remove without --allow-delete."""
    trash_days: float = DEFAULT_TRASH_DAYS
    compress: CompressMode = DEFAULT_COMPRESS
    """COMPRESS=DEFLATE for the connections that fetch: auto (over the Internet only), yes, no."""
    sync: SyncMode = DEFAULT_SYNC
    """``two-way``: local changes go to the server (issue #12); ``pull``: the server's word only."""
    local_delete: LocalDelete = DEFAULT_LOCAL_DELETE
    """What a file deleted locally does on the server: ``expunge`` (``\\Deleted`` and
    ``UID EXPUNGE`` of that UID), ``flag`` (``\\Deleted`` only) or ``keep`` (fetched again)."""

    @property
    def two_way(self) -> bool:
        return self.sync == "two-way"
    auth: AuthMode = "password"
    """How to log in: ``password`` (AUTHENTICATE PLAIN, else LOGIN) or an OAuth2 mode."""

    def wants(self, local_name: str) -> bool:
        """Whether the mailbox with this local name (``/`` hierarchy) is mirrored.

        ``*`` crosses ``/`` (fnmatch semantics), so ``Archive/*`` covers every
        level below Archive but not Archive itself. Exclusions win.
        """
        name = _fold_inbox(local_name)
        if not any(fnmatch.fnmatchcase(name, _fold_inbox(p)) for p in self.mailboxes):
            return False
        return not any(fnmatch.fnmatchcase(name, _fold_inbox(p)) for p in self.exclude)

    def wants_watched(self, local_name: str) -> bool:
        """Whether ``watch`` asks for this (mirrored) mailbox; without ``watch``, all are."""
        if self.watch is None:
            return True
        name = _fold_inbox(local_name)
        return any(fnmatch.fnmatchcase(name, _fold_inbox(p)) for p in self.watch)


@dataclass(frozen=True)
class NarrowedAccount(Account):
    """An account limited to some of its mailboxes, for ``run --once ACCOUNT/MAILBOX``.

    ``only`` are patterns like ``mailboxes``; a mailbox is wanted if the
    config mirrors it *and* one of them matches, so naming a mailbox never
    brings in one the config leaves out, and folders not named are neither
    synced nor set aside.
    """

    only: tuple[str, ...] = ()

    @classmethod
    def of(cls, account: Account, only: Sequence[str]) -> NarrowedAccount:
        values = {f.name: getattr(account, f.name) for f in fields(Account)}
        return cls(**values, only=tuple(only))

    def wants(self, local_name: str) -> bool:
        name = _fold_inbox(local_name)
        return super().wants(local_name) and any(fnmatch.fnmatchcase(name, _fold_inbox(p)) for p in self.only)


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    accounts: tuple[Account, ...]
    warnings: tuple[str, ...] = ()

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        raise KeyError(name)


# --------------------------------------------------------------------------
# Loading


def load_config(path: Path) -> Config:
    """Read, validate and type the config file at ``path``; raise ConfigError if unusable.

    Relative paths inside the file are taken relative to the file's own
    directory, not the working directory, so the file means the same thing
    whether the daemon is started by systemd or from a shell.
    """
    path = Path(path).expanduser()
    text, mode = _read(path)
    return _Parser(path, mode).parse(text)


def _read(path: Path) -> tuple[str, int]:
    # stat before open: opening a FIFO for reading would block the load.
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(path, "cannot read the config file: it is a directory")
        if not stat.S_ISREG(mode):
            raise ConfigError(path, "cannot read the config file: not a regular file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "cannot read the config file: no such file") from None
    except PermissionError:
        raise ConfigError(path, "cannot read the config file: permission denied") from None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(path, f"cannot read the config file: {reason}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, "the file is not valid UTF-8", line) from None
    return text, mode


@dataclass(frozen=True)
class _Entry:
    """One key/value pair of a mapping, with the dotted key used in messages."""

    key: str
    name: str
    key_node: Node
    node: Node

    @property
    def line(self) -> int:
        """The key's line: a block list or mapping value only starts on the next one."""
        return _line(self.key_node)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_@+-]+")


def _join(parent: str, name: str) -> str:
    # Quote names that would make the dotted key ambiguous ("my.work").
    part = name if _PLAIN_NAME.fullmatch(name) else '"' + name.replace('"', '\\"') + '"'
    return f"{parent}.{part}" if parent else part


def _describe(node: Node, secret: bool = False) -> str:
    """What a value is, for 'expected X, got Y'; a secret is named by its type only."""
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    assert isinstance(node, ScalarNode)
    if node.tag == _TAG_NULL:
        return "nothing (an empty value)"
    if secret:
        return "a value"
    if node.tag == _TAG_BOOL:
        return f"a boolean ({node.value})"
    if node.tag in (_TAG_INT, _TAG_FLOAT):
        return str(node.value)
    if node.tag == _TAG_STR:
        return repr(node.value)
    return f"a value tagged {node.tag}"


def _suggest(name: str, allowed: Collection[str]) -> str:
    lowered = {a.lower(): a for a in allowed}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[match[0]]!r}?" if match else ""


def _human(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Parser:
    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self.base = path.parent.absolute()
        self.warnings: list[str] = []

    # -- reporting ---------------------------------------------------------

    def fail(self, message: str, line: int | None = None, key: str | None = None) -> NoReturn:
        raise ConfigError(self.path, message, line, key)

    def warn(self, message: str, line: int, key: str) -> None:
        self.warnings.append(f"{self.path}:{line}: {key}: {message}")

    def expected(self, what: str, entry: _Entry, secret: bool = False) -> NoReturn:
        self.fail(f"expected {what}, got {_describe(entry.node, secret)}", entry.line, entry.key)

    # -- structure ---------------------------------------------------------

    def compose(self, text: str) -> Node | None:
        fast = getattr(yaml, "CSafeLoader", None)
        if fast is not None:
            # libyaml, where PyYAML has it: a tenth of the pure-Python parser's
            # 0.6 ms, at every start. Same nodes (tags, values, line numbers);
            # a file it refuses is parsed again below, so that the message is
            # the one the pure-Python parser gives.
            try:
                return yaml.compose(text, Loader=fast)
            except yaml.YAMLError:
                pass
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else None
            if isinstance(e, yaml.composer.ComposerError) and "another document" in (
                e.problem or ""
            ):
                self.fail("the file holds more than one YAML document; expected one", line)
            message = f"invalid YAML: {e.problem or e.context or 'syntax error'}"
            if e.context and e.problem:
                cm = e.context_mark
                if cm is not None and cm.line + 1 != line:
                    message += f" ({e.context}, which starts on line {cm.line + 1})"
                else:
                    message += f" ({e.context})"
            self.fail(message, line)
        except yaml.reader.ReaderError as e:
            line = text.count("\n", 0, max(e.position, 0)) + 1
            char = e.character if isinstance(e.character, int) else ord(e.character[:1] or "\0")
            self.fail(f"invalid YAML: the character U+{char:04X} is not allowed in YAML", line)
        except yaml.YAMLError as e:  # pragma: no cover - every YAML error is one of the above
            self.fail(f"invalid YAML: {e}")

    def entries(
        self, node: MappingNode, key: str, allowed: Collection[str] | None
    ) -> dict[str, _Entry]:
        """The pairs of a mapping in file order, after merges, checked for duplicates.

        YAML itself keeps the last of two equal keys without a word, which
        turns a copy-paste slip into a silently different config.
        """
        found = self._pairs(node, key, frozenset())
        if allowed is not None:
            for entry in found.values():
                if entry.name not in allowed:
                    listed = ", ".join(allowed)
                    self.fail(
                        f"unknown key {entry.name!r}{_suggest(entry.name, allowed)}"
                        f" (allowed here: {listed})",
                        entry.line,
                        entry.key,
                    )
        return found

    def _pairs(self, node: MappingNode, key: str, stack: frozenset[int]) -> dict[str, _Entry]:
        explicit: dict[str, _Entry] = {}
        merged: list[_Entry] = []
        inner = stack | {id(node)}
        for key_node, value_node in node.value:
            if key_node.tag == _TAG_MERGE:
                for source in self._merge_sources(value_node, key, _line(key_node)):
                    if id(source) in inner:
                        self.fail("a merge (<<) refers to itself", _line(key_node), key or None)
                    merged.extend(self._pairs(source, key, inner).values())
                continue
            if not isinstance(key_node, ScalarNode):
                self.fail(
                    "a key must be a plain name, not a list or mapping",
                    _line(key_node),
                    key or None,
                )
            name = key_node.value
            entry = _Entry(_join(key, name), name, key_node, value_node)
            if name in explicit:
                self.fail(
                    f"duplicate key {name!r} (first given on line {explicit[name].line});"
                    " YAML would silently keep only the last one",
                    entry.line,
                    entry.key,
                )
            explicit[name] = entry
        for entry in merged:
            explicit.setdefault(entry.name, entry)
        return explicit

    def _merge_sources(self, node: Node, key: str, line: int) -> Iterator[MappingNode]:
        if isinstance(node, MappingNode):
            yield node
            return
        if isinstance(node, SequenceNode) and all(isinstance(n, MappingNode) for n in node.value):
            yield from node.value
            return
        self.fail("a merge (<<) takes a mapping or a list of mappings", line, key or None)

    # -- scalar values -----------------------------------------------------

    def text(self, entry: _Entry, what: str = "a string", secret: bool = False) -> str:
        """A scalar's text exactly as written.

        Numbers and YAML 1.1 booleans are taken as typed (a numeric username,
        a password ``0123``), since converting them would change the value.
        """
        node = entry.node
        if not isinstance(node, ScalarNode) or node.tag not in _SCALAR_TAGS:
            self.expected(what, entry, secret)
        if node.tag == _TAG_NULL or node.value == "":
            self.fail(f"expected {what}, got an empty value", entry.line, entry.key)
        return str(node.value)

    def integer(self, entry: _Entry, low: int, high: int) -> int:
        node = entry.node
        what = f"an integer from {low} to {high}"
        if isinstance(node, ScalarNode) and node.tag == _TAG_INT:
            value = yaml.constructor.SafeConstructor().construct_yaml_int(node)
            if low <= value <= high:
                return value
            self.fail(f"expected {what}, got {value}", entry.line, entry.key)
        if isinstance(node, ScalarNode) and node.tag == _TAG_STR and node.value.strip().isdigit():
            self.fail(
                f"expected {what}, got the string {node.value!r} (write the number without quotes)",
                entry.line,
                entry.key,
            )
        self.expected(what, entry)

    def share(self, entry: _Entry) -> float:
        """A share from ``50%`` (or a bare ``50``, read as percent) to 0.5."""
        what = "a percentage from 0% to 100%, such as 50%"
        node = entry.node
        if not isinstance(node, ScalarNode) or node.tag not in (_TAG_INT, _TAG_FLOAT, _TAG_STR):
            self.expected(what, entry)
        text = str(node.value).strip().rstrip("%").strip()
        try:
            value = float(text)
        except ValueError:
            self.fail(f"expected {what}, got {node.value!r}", entry.line, entry.key)
        if not 0 <= value <= 100:
            self.fail(f"expected {what}, got {node.value!r}", entry.line, entry.key)
        return value / 100

    def number(self, entry: _Entry, low: float, high: float) -> float:
        node = entry.node
        what = f"a number from {low:g} to {high:g}"
        if isinstance(node, ScalarNode) and node.tag in (_TAG_INT, _TAG_FLOAT):
            value = float(node.value)
            if low <= value <= high:
                return value
            self.fail(f"expected {what}, got {node.value}", entry.line, entry.key)
        self.expected(what, entry)

    def duration(self, entry: _Entry, low: float, high: float) -> float:
        """Seconds, from ``30s``, ``5m``, ``1h``, ``500ms`` or a bare number of seconds."""
        what = "a duration such as 30s, 5m or 1h"
        node = entry.node
        if not isinstance(node, ScalarNode) or node.tag not in (_TAG_INT, _TAG_FLOAT, _TAG_STR):
            self.expected(what, entry)
        match = _DURATION.fullmatch(str(node.value))
        if match is None:
            self.fail(f"expected {what}, got {node.value!r}", entry.line, entry.key)
        seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
        if not low <= seconds <= high:
            self.fail(
                f"expected a duration from {_human(low)} to {_human(high)}, got {node.value!r}",
                entry.line,
                entry.key,
            )
        return seconds

    def choice(self, entry: _Entry, choices: tuple[str, ...]) -> str:
        what = "one of " + ", ".join(choices)
        value = self.text(entry, what)
        if value not in choices:
            self.fail(
                f"expected {what}, got {value!r}{_suggest(value, choices)}", entry.line, entry.key
            )
        return value

    def path_value(self, entry: _Entry) -> Path:
        raw = self.text(entry, "a path")
        if "\0" in raw:
            self.fail("a path cannot contain a NUL character", entry.line, entry.key)
        expanded = os.path.expanduser(raw)
        if expanded.startswith("~"):
            self.fail(
                f"cannot expand {raw!r}: no such user or no home directory", entry.line, entry.key
            )
        return self.base / expanded  # an absolute path replaces the base

    def strings(self, entry: _Entry, what: str, item: str, example: str) -> tuple[str, ...]:
        """A list of non-empty scalars; a lone string is refused, not wrapped."""
        node = entry.node
        if not isinstance(node, SequenceNode):
            hint = f" such as {example}" if isinstance(node, ScalarNode) else ""
            self.expected(f"a list of {what}{hint}", entry)
        items: list[str] = []
        for i, node_i in enumerate(node.value):
            item_entry = _Entry(f"{entry.key}[{i}]", str(i), node_i, node_i)
            items.append(self.text(item_entry, f"a string ({item})"))
        return tuple(items)

    # -- the file ----------------------------------------------------------

    def parse(self, text: str) -> Config:
        root = self.compose(text)
        if root is None:
            self.fail("the file is empty; it needs an 'accounts' mapping with at least one account")
        if not isinstance(root, MappingNode):
            self.fail(
                "expected a mapping (with 'accounts' and optionally 'state_dir') at the"
                f" top level, got {_describe(root)}",
                _line(root),
            )
        top = self._top_entries(root)

        state_dir = self.path_or_default(top.get("state_dir"), default_state_dir)
        accounts_entry = top.get("accounts")
        if accounts_entry is None:
            self.fail(
                "missing; the file needs at least one account under 'accounts:'",
                _line(root),
                "accounts",
            )
        accounts = self.accounts(accounts_entry)
        return Config(self.path, state_dir, accounts, tuple(self.warnings))

    def _top_entries(self, root: MappingNode) -> dict[str, _Entry]:
        found = self.entries(root, "", None)
        for entry in found.values():
            if entry.name in TOP_KEYS:
                continue
            hint = ""
            if isinstance(entry.node, MappingNode) and any(
                isinstance(k, ScalarNode) and k.value == "host" for k, _ in entry.node.value
            ):
                hint = f"; if {entry.name!r} is an account, put it under 'accounts:'"
            self.fail(
                f"unknown key {entry.name!r}{_suggest(entry.name, TOP_KEYS) or hint}"
                f" (allowed here: {', '.join(TOP_KEYS)})",
                entry.line,
                entry.key,
            )
        return found

    def path_or_default(self, entry: _Entry | None, default: Callable[[], Path]) -> Path:
        return default() if entry is None else self.path_value(entry)

    def accounts(self, entry: _Entry) -> tuple[Account, ...]:
        node = entry.node
        if (isinstance(node, ScalarNode) and node.tag == _TAG_NULL) or (
            isinstance(node, MappingNode) and not node.value
        ):
            self.fail("no accounts; add at least one", entry.line, entry.key)
        if not isinstance(node, MappingNode):
            self.expected("a mapping from account names to their settings", entry)
        accounts: list[Account] = []
        maildirs: dict[str, tuple[str, int]] = {}
        for account_entry in self.entries(node, "accounts", None).values():
            account, maildir_line = self.account(account_entry)
            key = os.path.normpath(account.maildir)
            if key in maildirs:
                other, other_line = maildirs[key]
                self.fail(
                    f"the same Maildir as account {other!r} (line {other_line});"
                    " each account needs its own",
                    maildir_line,
                    _join(account_entry.key, "maildir"),
                )
            maildirs[key] = (account.name, maildir_line)
            accounts.append(account)
        return tuple(accounts)

    def account(self, entry: _Entry) -> tuple[Account, int]:
        assert isinstance(entry.key_node, ScalarNode)
        name = entry.name
        if entry.key_node.tag == _TAG_NULL or not name.strip():
            self.fail("an account name cannot be empty", entry.line, entry.key)
        # The name becomes a file name under state_dir (locks, state) and a
        # word in log lines, so it must be one safe path component.
        if "/" in name or "\\" in name or name in (".", "..") or not name.isprintable():
            self.fail(
                f"an account name cannot contain '/', '\\' or control characters,"
                f" nor be '.' or '..'; got {name!r}",
                entry.line,
                entry.key,
            )
        node = entry.node
        if not isinstance(node, MappingNode):
            hint = ""
            if name in ACCOUNT_KEYS:
                hint = (
                    f" ({name!r} looks like an account setting; settings go one level"
                    " deeper, under an account name)"
                )
            self.expected(f"a mapping of settings for account {name!r}{hint}", entry)
        found = self.entries(node, entry.key, ACCOUNT_KEYS)

        # Values are checked in file order, so the first problem in the file
        # is the one reported.
        values: dict[str, object] = {}
        for key, item in found.items():
            values[key] = self.account_value(key, item)

        for key in REQUIRED_ACCOUNT_KEYS:
            if key not in found:
                self.fail(
                    "required key missing (every account needs "
                    f"{', '.join(REQUIRED_ACCOUNT_KEYS[:-1])} and {REQUIRED_ACCOUNT_KEYS[-1]})",
                    entry.line,
                    _join(entry.key, key),
                )
        auth = cast(AuthMode, values.get("auth", "password"))
        if auth in OAUTH_AUTH_MODES:
            password = self.token_source(name, entry, found, values, auth)
        else:
            if "token_command" in found:
                self.fail(
                    "a token command is for OAuth2 sign-in: add 'auth: oauth2' to this account"
                    " (or use password_command for a password)",
                    found["token_command"].line,
                    found["token_command"].key,
                )
            password = self.password(name, entry, found, values)

        host = cast(str, values["host"])
        tls = cast(TLSMode, values.get("tls", "implicit"))
        if tls == "none" and not _is_loopback(host):
            self.fail(
                "tls: none would send the password in the clear; it is allowed only for a"
                f" loopback host (127.0.0.0/8, ::1, localhost), not {host!r}",
                found["tls"].line,
                found["tls"].key,
            )
        if tls == "none" and "ca_file" in found:
            self.warn("not used with tls: none", found["ca_file"].line, found["ca_file"].key)

        # account_value() produced each value with the type its key needs.
        account = Account(
            name=name,
            host=host,
            port=cast(int, values.get("port", DEFAULT_PORTS[tls])),
            tls=tls,
            ca_file=cast("Path | None", values.get("ca_file")),
            username=cast(str, values["username"]),
            password=password,
            maildir=cast(Path, values["maildir"]),
            mailboxes=cast("tuple[str, ...]", values.get("mailboxes", DEFAULT_MAILBOXES)),
            exclude=cast("tuple[str, ...]", values.get("exclude", ())),
            workers=cast(int, values.get("workers", DEFAULT_WORKERS)),
            watch=cast("tuple[str, ...] | None", values.get("watch")),
            max_connections=cast(int, values.get("max_connections", DEFAULT_MAX_CONNECTIONS)),
            poll_interval=cast(float, values.get("poll_interval", DEFAULT_POLL_INTERVAL)),
            idle_renew=cast(float, values.get("idle_renew", DEFAULT_IDLE_RENEW)),
            on_new_mail=cast("tuple[str, ...] | None", values.get("on_new_mail")),
            max_delete=cast(float, values.get("max_delete", DEFAULT_MAX_DELETE)),
            trash_days=cast(float, values.get("trash_days", DEFAULT_TRASH_DAYS)),
            compress=cast(CompressMode, values.get("compress", DEFAULT_COMPRESS)),
            sync=cast(SyncMode, values.get("sync", DEFAULT_SYNC)),
            local_delete=cast(LocalDelete, values.get("local_delete", DEFAULT_LOCAL_DELETE)),
            auth=auth,
        )
        if account.workers >= account.max_connections:
            self.fail(
                f"workers ({account.workers}) must be fewer than max_connections"
                f" ({account.max_connections}), to leave room for at least one watcher",
                found["workers"].line if "workers" in found else entry.line,
                _join(entry.key, "workers"),
            )
        return account, found["maildir"].line

    def account_value(self, key: str, entry: _Entry) -> object:
        if key == "host":
            return self.host(entry)
        if key == "port":
            return self.integer(entry, 1, 65535)
        if key == "tls":
            return self.choice(entry, TLS_MODES)
        if key == "ca_file":
            return self.ca_file(entry)
        if key == "username":
            return self.text(entry)
        if key == "auth":
            return self.choice(entry, AUTH_MODES)
        if key in ("password_command", "token_command"):
            return self.argv(entry)
        if key == "password_file":
            return self.path_value(entry)
        if key == "password":
            return self.text(entry, "a string", secret=True)
        if key == "maildir":
            return self.path_value(entry)
        if key in ("mailboxes", "exclude"):
            patterns = self.strings(entry, "patterns", "a pattern", '["INBOX", "Archive/*"]')
            if key == "mailboxes" and not patterns:
                self.fail(
                    "an empty list would mirror nothing; leave the key out to mirror everything",
                    entry.line,
                    entry.key,
                )
            return patterns
        if key == "workers":
            return self.integer(entry, 1, MAX_WORKERS)
        if key == "watch":
            return self.strings(entry, "patterns", "a pattern", '["INBOX"]')
        if key == "max_connections":
            return self.integer(entry, 2, 1000)
        if key == "poll_interval":
            return self.duration(entry, 1.0, 24 * 3600.0)
        if key == "idle_renew":
            return self.duration(entry, 10.0, MAX_IDLE_RENEW)
        if key == "on_new_mail":
            return self.argv(entry)
        if key == "max_delete":
            return self.share(entry)
        if key == "trash_days":
            return self.number(entry, 0, 3650)
        if key == "compress":
            return self.compress_mode(entry)
        if key == "sync":
            return self.choice(entry, SYNC_MODES)
        if key == "local_delete":
            return self.choice(entry, LOCAL_DELETE_MODES)
        raise AssertionError(key)  # pragma: no cover - entries() allows only ACCOUNT_KEYS

    def compress_mode(self, entry: _Entry) -> str:
        """auto, yes or no; YAML's true/false (what ``compress: yes`` parses as) mean yes/no."""
        node = entry.node
        if isinstance(node, ScalarNode) and node.tag == _TAG_BOOL:
            return "yes" if node.value.lower() in ("true", "yes", "on", "y") else "no"
        return self.choice(entry, COMPRESS_MODES)

    def host(self, entry: _Entry) -> str:
        host = self.text(entry, "a host name or address")
        if any(c.isspace() for c in host) or "/" in host or (":" in host and not _is_ipv6(host)):
            self.fail(
                "expected a host name or address without a scheme, port or brackets"
                f" (the port goes under 'port:'), got {host!r}",
                entry.line,
                entry.key,
            )
        return host

    def ca_file(self, entry: _Entry) -> Path:
        path = self.path_value(entry)
        # stat before open: opening a FIFO for reading would block the load.
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                self.fail(f"not a regular file: {path}", entry.line, entry.key)
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            self.fail(f"no such file: {path}", entry.line, entry.key)
        except PermissionError:
            self.fail(f"cannot read {path}: permission denied", entry.line, entry.key)
        except OSError as e:
            self.fail(
                f"cannot read {path}: {e.strerror or type(e).__name__}", entry.line, entry.key
            )
        return path

    def argv(self, entry: _Entry) -> tuple[str, ...]:
        argv = self.strings(
            entry, "arguments", "an argument", "[pass, show, mail/personal] (no shell is used)"
        )
        if not argv:
            self.fail(
                "expected a non-empty list of arguments, such as [pass, show, mail/personal]",
                entry.line,
                entry.key,
            )
        if any("\0" in a for a in argv):
            self.fail("an argument cannot contain a NUL character", entry.line, entry.key)
        return tuple(expand_home(a) for a in argv)

    def password(
        self, name: str, account: _Entry, found: dict[str, _Entry], values: dict[str, object]
    ) -> PasswordSource:
        given = [found[k] for k in PASSWORD_KEYS if k in found]
        if not given:
            self.fail(
                "no password source; give one of password_command, password_file or password",
                account.line,
                account.key,
            )
        if len(given) > 1:
            given.sort(key=lambda e: e.line)
            listed = ", ".join(f"{e.name} (line {e.line})" for e in given)
            self.fail(
                f"more than one password source: {listed}; keep exactly one",
                given[-1].line,
                given[-1].key,
            )
        entry = given[0]
        value = values[entry.name]
        if entry.name == "password_command":
            return PasswordSource(name, command=cast("tuple[str, ...]", value))
        if entry.name == "password_file":
            assert isinstance(value, Path)
            self._check_private(value, entry)
            return PasswordSource(name, file=value)
        if os.name == "posix" and self.mode & 0o044:
            self.warn(
                f"account {name!r} has an inline password in a file readable by group or"
                f" others (mode {stat.S_IMODE(self.mode):04o}); run"
                f" 'chmod 600 {shlex.quote(str(self.path))}' or use password_command instead",
                entry.line,
                entry.key,
            )
        return PasswordSource(name, inline=cast(str, value))

    def token_source(
        self, name: str, account: _Entry, found: dict[str, _Entry], values: dict[str, object], auth: str
    ) -> PasswordSource:
        """An OAuth2 account's token command; a password next to it would never be used."""
        for key in PASSWORD_KEYS:
            if key in found:
                self.fail(
                    f"auth: {auth} signs in with a token from token_command, so {key} would never"
                    " be used; remove it (or set auth: password)",
                    found[key].line,
                    found[key].key,
                )
        if "token_command" not in found:
            self.fail(
                f"auth: {auth} needs a token_command that prints an access token,"
                " such as [pizauth, show, work] or [oama, access, me@example.com]",
                found["auth"].line,
                found["auth"].key,
            )
        return PasswordSource(name, command=cast("tuple[str, ...]", values["token_command"]), token=True)

    def _check_private(self, path: Path, entry: _Entry) -> None:
        """Warn about a password file others can read; its absence is resolve()'s business."""
        if os.name != "posix":
            return
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return
        if mode & 0o044:
            self.warn(
                f"{path} is readable by group or others (mode {stat.S_IMODE(mode):04o});"
                f" run 'chmod 600 {shlex.quote(str(path))}'",
                entry.line,
                entry.key,
            )


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
