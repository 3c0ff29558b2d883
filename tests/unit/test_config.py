"""Tests for the account file: typed results, defaults, and one precise error per mistake.

Every error test checks the line and the dotted key, because "file:line: key:"
is what lets a user fix a config without reading code.
"""

from __future__ import annotations

import glob
import os
import pickle
import sys
import textwrap
from pathlib import Path

import platformdirs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrord.config import (
    ACCOUNT_KEYS,
    TOP_KEYS,
    Account,
    Config,
    ConfigError,
    PasswordError,
    PasswordSource,
    default_config_path,
    default_state_dir,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
SECRET = "hunter2-s3cret"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and signals")
not_root = pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode")

# Line numbers below refer to this layout: "accounts:" is line 1, the
# account name line 2, host line 3, ..., maildir line 6; additions start at 7.
BASE = """\
accounts:
  personal:
    host: imap.example.org
    username: me@example.org
    password_command: [pass, show, mail/personal]
    maildir: ~/Mail/personal
"""


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME, so ~ and the platformdirs defaults are predictable."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


def write(tmp_path: Path, text: str, mode: int = 0o600, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    path.chmod(mode)
    return path


def load(tmp_path: Path, text: str, mode: int = 0o600) -> Config:
    return load_config(write(tmp_path, text, mode))


def fails(tmp_path: Path, text: str, line: int | None, key: str | None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.path, err.line, err.key) == (path, line, key), str(err)
    where = f"{path}:{line}" if line is not None else str(path)
    prefix = f"{where}: {key}: " if key else f"{where}: "
    assert str(err) == prefix + err.message
    return err


def account(**overrides: object) -> Account:
    fields: dict[str, object] = dict(
        name="a",
        host="imap.example.org",
        port=993,
        tls="implicit",
        ca_file=None,
        username="me",
        password=PasswordSource("a", inline="x"),
        maildir=Path("/m"),
    )
    fields.update(overrides)
    return Account(**fields)  # type: ignore[arg-type]


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


# --------------------------------------------------------------------------
# Valid files and defaults


def test_minimal_account_gets_the_documented_defaults(tmp_path: Path, home: Path) -> None:
    config = load(tmp_path, BASE)
    assert config.path == tmp_path / "config.yaml"
    assert config.state_dir == default_state_dir() == home / ".local/state/mirrord"
    assert config.warnings == ()
    (acct,) = config.accounts
    assert acct == Account(
        name="personal",
        host="imap.example.org",
        port=993,
        tls="implicit",
        ca_file=None,
        username="me@example.org",
        password=PasswordSource("personal", command=("pass", "show", "mail/personal")),
        maildir=home / "Mail/personal",
        mailboxes=("*",),
        exclude=(),
        workers=4,
    )
    assert config.account("personal") is acct
    with pytest.raises(KeyError):
        config.account("nobody")


@pytest.mark.parametrize(
    ("tls", "host", "port"),
    [
        ("implicit", "imap.example.org", 993),
        ("starttls", "imap.example.org", 143),
        ("none", "localhost", 143),
    ],
)
def test_default_port_follows_tls(tmp_path: Path, tls: str, host: str, port: int) -> None:
    text = BASE.replace("imap.example.org", host) + f"    tls: {tls}\n"
    (acct,) = load(tmp_path, text).accounts
    assert (acct.tls, acct.port) == (tls, port)


def test_every_key_given_explicitly(tmp_path: Path, home: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = load(
        tmp_path,
        f"""\
        state_dir: /var/tmp/mirrord-state
        accounts:
          work:
            host: mail.example.com
            port: 1993
            tls: starttls
            ca_file: {ca}
            username: 12345
            password_file: ~/.pw
            maildir: /srv/mail/work
            mailboxes: [INBOX, "Archive/*"]
            exclude: [Archive/Old]
            workers: 32
            watch: [INBOX]
            max_connections: 40
            poll_interval: 90s
            idle_renew: 15m
        """,
    )
    assert config.state_dir == Path("/var/tmp/mirrord-state")
    (acct,) = config.accounts
    assert acct.port == 1993 and acct.tls == "starttls" and acct.ca_file == ca
    assert acct.username == "12345"  # a numeric user name is kept as written
    assert acct.password == PasswordSource("work", file=home / ".pw")
    assert acct.maildir == Path("/srv/mail/work")
    assert acct.mailboxes == ("INBOX", "Archive/*") and acct.exclude == ("Archive/Old",)
    assert acct.workers == 32
    assert acct.watch == ("INBOX",) and acct.max_connections == 40
    assert acct.poll_interval == 90.0 and acct.idle_renew == 900.0


def test_accounts_keep_file_order(tmp_path: Path) -> None:
    text = "accounts:\n"
    for name in ("zeta", "alpha", "mid"):
        text += (
            f"  {name}:\n    host: h\n    username: u\n    password: p\n    maildir: /m/{name}\n"
        )
    assert [a.name for a in load(tmp_path, text).accounts] == ["zeta", "alpha", "mid"]


def test_tilde_is_expanded_in_every_path(tmp_path: Path, home: Path) -> None:
    (home / "ca.pem").write_text("pem\n")
    config = load(
        tmp_path,
        """\
        state_dir: ~/state
        accounts:
          personal:
            host: h
            username: u
            password_file: ~/secret
            ca_file: ~/ca.pem
            maildir: ~/Mail/personal
        """,
    )
    (acct,) = config.accounts
    assert config.state_dir == home / "state"
    assert acct.maildir == home / "Mail/personal"
    assert acct.ca_file == home / "ca.pem"
    assert acct.password.file == home / "secret"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load(tmp_path, BASE.replace("~/Mail/personal", "mail/personal") + "state_dir: state\n")
    assert config.accounts[0].maildir == tmp_path / "mail/personal"
    assert config.state_dir == tmp_path / "state"


def test_default_paths_come_from_platformdirs() -> None:
    assert default_config_path() == Path(platformdirs.user_config_dir("mirrord")) / "config.yaml"
    assert default_state_dir() == Path(platformdirs.user_state_dir("mirrord"))


def test_loading_writes_nothing(tmp_path: Path, home: Path) -> None:
    path = write(tmp_path, BASE + "state_dir: ~/state\n")
    before = sorted(p for p in tmp_path.rglob("*"))
    load_config(path)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (home / "Mail").exists() and not (home / "state").exists()


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1", "127.9.8.7", "::1"])
def test_tls_none_is_allowed_on_loopback(tmp_path: Path, host: str) -> None:
    text = BASE.replace("imap.example.org", f'"{host}"') + "    tls: none\n"
    assert load(tmp_path, text).accounts[0].tls == "none"


def test_merge_keys_share_settings_between_accounts(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        accounts:
          one: &common
            host: h
            username: u
            password: p
            maildir: /m/one
          two:
            <<: *common
            username: v
            maildir: /m/two
        """,
    )
    one, two = config.accounts
    assert (two.host, two.username, two.maildir) == ("h", "v", Path("/m/two"))
    assert one.username == "u"


def test_example_config_loads_and_documents_every_key() -> None:
    example = REPO / "config.example.yaml"
    config = load_config(example)
    (acct,) = config.accounts
    assert acct.name == "personal" and acct.password.command is not None
    text = example.read_text()
    for key in TOP_KEYS + ACCOUNT_KEYS:
        assert f"{key}:" in text, key


# --------------------------------------------------------------------------
# Errors: the file itself


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.key) == (None, None)
    assert str(info.value) == f"{path}: cannot read the config file: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="it is a directory") as info:
        load_config(tmp_path)
    assert info.value.line is None


@posix_only
@not_root
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE, mode=0o000)
    with pytest.raises(ConfigError, match="permission denied") as info:
        load_config(path)
    assert info.value.line is None


def test_unreadable_file_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same path as above, reachable when the tests run as root."""
    path = write(tmp_path, BASE)

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the config file: permission denied"


@posix_only
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


def test_error_message_format(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + "    port: abc\n", 7, "accounts.personal.port")
    assert str(err) == (
        f"{tmp_path / 'config.yaml'}:7: accounts.personal.port:"
        " expected an integer from 1 to 65535, got 'abc'"
    )


def test_config_error_pickles() -> None:
    err = ConfigError(Path("/c.yaml"), "bad", 3, "accounts")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) == "/c.yaml:3: accounts: bad"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("accounts:\n  personal:\n    host: a: b\n", 3, "mapping values are not allowed"),
        ('accounts:\n  personal:\n    host: "open\n', 4, "which starts on line 3"),
        ("accounts:\n  - [x\n  y: 1\n", 3, "invalid YAML"),
        ("accounts:\n\thost: x\n", 2, "invalid YAML"),
        ("accounts: {}\n---\naccounts: {}\n", 2, "more than one YAML document"),
        ("accounts:\n  p: \x07\n", 2, "U+0007"),
    ],
)
def test_yaml_syntax_errors_give_the_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    err = fails(tmp_path, text, line, None)
    assert fragment in err.message


def test_invalid_utf8_gives_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"accounts:\n  personal:\n    host: caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid UTF-8") as info:
        load_config(path)
    assert info.value.line == 3


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    err = fails(tmp_path, text, None, None)
    assert "empty" in err.message


@pytest.mark.parametrize(
    ("text", "got"), [("- a\n- b\n", "a list"), ("just text\n", "'just text'")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    err = fails(tmp_path, text, 1, None)
    assert "top level" in err.message and err.message.endswith(f"got {got}")


# --------------------------------------------------------------------------
# Errors: structure


def test_no_accounts_key(tmp_path: Path) -> None:
    err = fails(tmp_path, "state_dir: /s\n", 1, "accounts")
    assert "at least one account" in err.message


@pytest.mark.parametrize("value", ["", " {}", " ~"])
def test_empty_accounts(tmp_path: Path, value: str) -> None:
    err = fails(tmp_path, f"state_dir: /s\naccounts:{value}\n", 2, "accounts")
    assert "no accounts" in err.message


def test_accounts_as_a_list(tmp_path: Path) -> None:
    err = fails(tmp_path, "accounts:\n  - host: h\n", 1, "accounts")
    assert err.message == "expected a mapping from account names to their settings, got a list"


def test_account_settings_directly_under_accounts(tmp_path: Path) -> None:
    err = fails(tmp_path, "accounts:\n  host: h\n", 2, "accounts.host")
    assert "one level deeper" in err.message


def test_unknown_account_key_suggests_the_close_one(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + "    wrokers: 4\n", 7, "accounts.personal.wrokers")
    assert "unknown key 'wrokers'; did you mean 'workers'?" in err.message
    assert "allowed here: host, port, tls," in err.message


def test_unknown_key_without_a_close_match_lists_the_allowed_ones(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + "    colour: blue\n", 7, "accounts.personal.colour")
    assert "did you mean" not in err.message
    assert "allowed here: " + ", ".join(ACCOUNT_KEYS) in err.message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = fails(tmp_path, "stat_dir: /s\n" + BASE, 1, "stat_dir")
    assert "did you mean 'state_dir'?" in err.message


def test_account_at_top_level_gets_a_hint(tmp_path: Path) -> None:
    err = fails(tmp_path, "personal:\n  host: h\n", 1, "personal")
    assert "put it under 'accounts:'" in err.message


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        (BASE + "    host: other\n", 7, "accounts.personal.host"),
        (BASE + "  personal:\n    host: h\n", 7, "accounts.personal"),
        ("state_dir: /a\nstate_dir: /b\n" + BASE, 2, "state_dir"),
        ("accounts: {p: {host: a, host: b}}\n", 1, "accounts.p.host"),
    ],
)
def test_duplicate_keys_are_errors(tmp_path: Path, text: str, line: int, key: str) -> None:
    err = fails(tmp_path, text, line, key)
    assert "duplicate key" in err.message and "first given on line" in err.message


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ('""', 'accounts.""'),
        ('" "', 'accounts." "'),
        ("~", 'accounts."~"'),
        ("null", "accounts.null"),
    ],
)
def test_empty_account_name(tmp_path: Path, name: str, key: str) -> None:
    err = fails(tmp_path, BASE.replace("personal:", f"{name}:", 1), 2, key)
    assert err.message == "an account name cannot be empty"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ('"a/b"', 'accounts."a/b"'),
        ('".."', 'accounts.".."'),
        ('"tab\\there"', 'accounts."tab\there"'),
    ],
)
def test_account_name_must_be_a_safe_file_name(tmp_path: Path, name: str, key: str) -> None:
    err = fails(tmp_path, BASE.replace("personal:", f"{name}:", 1), 2, key)
    assert err.message.startswith("an account name cannot contain")


@pytest.mark.parametrize("missing", ["host", "username", "maildir"])
def test_missing_required_key_points_at_the_account(tmp_path: Path, missing: str) -> None:
    text = "".join(
        line + "\n" for line in BASE.splitlines() if not line.strip().startswith(missing + ":")
    )
    err = fails(tmp_path, text, 2, f"accounts.personal.{missing}")
    assert "required key missing" in err.message


def test_first_problem_in_the_file_is_reported(tmp_path: Path) -> None:
    fails(tmp_path, BASE + "    workers: 0\n    port: 0\n", 7, "accounts.personal.workers")


# --------------------------------------------------------------------------
# Errors: values


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ("mailboxes: INBOX", "mailboxes", "expected a list of patterns such as"),
        ("exclude: {a: b}", "exclude", "expected a list of patterns, got a mapping"),
        ("mailboxes: [INBOX, [x]]", "mailboxes[1]", "expected a string (a pattern), got a list"),
        ("mailboxes: [INBOX, ~]", "mailboxes[1]", "got an empty value"),
        ("mailboxes: []", "mailboxes", "would mirror nothing"),
        ("tls: [implicit]", "tls", "got a list"),
    ],
)
def test_wrong_types(tmp_path: Path, line: str, key: str, expected: str) -> None:
    err = fails(tmp_path, BASE + f"    {line}\n", 7, f"accounts.personal.{key}")
    assert expected in err.message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("host", "[a, b]", "got a list"),
        ("host", "imap.example.org:993", "the port goes under 'port:'"),
        ("host", "imaps://imap.example.org", "without a scheme"),
        ("host", '""', "got an empty value"),
        ("username", "{a: 1}", "got a mapping"),
        ("username", "", "got an empty value"),
        ("maildir", "[a]", "expected a path, got a list"),
    ],
)
def test_bad_required_values(tmp_path: Path, field: str, value: str, expected: str) -> None:
    lines = {"host": 3, "username": 4, "maildir": 6}
    text = "".join(
        (f"    {field}: {value}\n" if line.strip().startswith(field + ":") else line + "\n")
        for line in BASE.splitlines()
    )
    err = fails(tmp_path, text, lines[field], f"accounts.personal.{field}")
    assert expected in err.message


@pytest.mark.parametrize(
    ("field", "value", "got"),
    [
        ("port", "0", "got 0"),
        ("port", "65536", "got 65536"),
        ("port", "abc", "got 'abc'"),
        ("port", '"993"', "got the string '993' (write the number without quotes)"),
        ("port", "true", "got a boolean (true)"),
        ("port", "99.5", "got 99.5"),
        ("port", "", "got nothing"),
        ("workers", "0", "got 0"),
        ("workers", "33", "got 33"),
        ("workers", "'4'", "got the string '4'"),
        ("workers", "yes", "got a boolean (yes)"),
        ("workers", "[4]", "got a list"),
    ],
)
def test_integers_and_ranges(tmp_path: Path, field: str, value: str, got: str) -> None:
    err = fails(tmp_path, BASE + f"    {field}: {value}\n", 7, f"accounts.personal.{field}")
    bounds = "1 to 65535" if field == "port" else "1 to 32"
    assert err.message.startswith(f"expected an integer from {bounds}, {got}")


def test_integers_accept_yaml_int_spellings(tmp_path: Path) -> None:
    (acct,) = load(tmp_path, BASE + "    port: 0x3e1\n    workers: +8\n").accounts
    assert (acct.port, acct.workers) == (993, 8)


def test_bad_tls_value(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + "    tls: starttsl\n", 7, "accounts.personal.tls")
    assert (
        "expected one of implicit, starttls, none, got 'starttsl'; did you mean 'starttls'?"
        == err.message
    )


# 203.0.113.7 is a documentation address (RFC 5737): only validated, never contacted.
@pytest.mark.parametrize("host", ["imap.example.org", "203.0.113.7", "localhost.example.org", "::2"])
def test_tls_none_needs_a_loopback_host(tmp_path: Path, host: str) -> None:
    text = BASE.replace("imap.example.org", f'"{host}"') + "    port: 143\n    tls: none\n"
    err = fails(tmp_path, text, 8, "accounts.personal.tls")
    assert "loopback" in err.message and repr(host) in err.message


def test_no_password_source(tmp_path: Path) -> None:
    text = BASE.replace("    password_command: [pass, show, mail/personal]\n", "")
    err = fails(tmp_path, text, 2, "accounts.personal")
    assert "no password source" in err.message
    assert all(k in err.message for k in ("password_command", "password_file", "password"))


def test_several_password_sources(tmp_path: Path) -> None:
    text = BASE + f"    password: {SECRET}\n    password_file: /pw\n"
    err = fails(tmp_path, text, 8, "accounts.personal.password_file")
    assert "more than one password source" in err.message
    assert "password_command (line 5), password (line 7), password_file (line 8)" in err.message
    assert SECRET not in str(err)


@pytest.mark.parametrize(
    ("value", "key", "expected"),
    [
        ("pass show mail/personal", "password_command", "expected a list of arguments such as"),
        ("[]", "password_command", "non-empty list"),
        ("[pass, [show]]", "password_command[1]", "got a list"),
        ('[""]', "password_command[0]", "got an empty value"),
        ("[pass, ~]", "password_command[1]", "got an empty value"),
        ("{a: b}", "password_command", "got a mapping"),
    ],
)
def test_password_command_must_be_a_list_of_strings(
    tmp_path: Path, value: str, key: str, expected: str
) -> None:
    text = BASE.replace("[pass, show, mail/personal]", value)
    err = fails(tmp_path, text, 5, f"accounts.personal.{key}")
    assert expected in err.message


def test_ca_file_must_exist(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + "    ca_file: /no/such/ca.pem\n", 7, "accounts.personal.ca_file")
    assert err.message == "no such file: /no/such/ca.pem"


def test_ca_file_must_be_a_file(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + f"    ca_file: {tmp_path}\n", 7, "accounts.personal.ca_file")
    assert "not a regular file" in err.message


@posix_only
@not_root
def test_ca_file_must_be_readable(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    ca.chmod(0)
    err = fails(tmp_path, BASE + f"    ca_file: {ca}\n", 7, "accounts.personal.ca_file")
    assert "permission denied" in err.message


def test_two_accounts_cannot_share_a_maildir(tmp_path: Path) -> None:
    text = (
        BASE
        + "  work:\n    host: h\n    username: u\n    password: p\n    maildir: ~/Mail/personal/\n"
    )
    err = fails(tmp_path, text, 11, "accounts.work.maildir")
    assert "the same Maildir as account 'personal' (line 6)" in err.message


def test_account_names_with_dots_are_quoted_in_keys(tmp_path: Path) -> None:
    fails(
        tmp_path,
        BASE.replace("personal:", "my.work:", 1) + "    workers: 0\n",
        7,
        'accounts."my.work".workers',
    )


@pytest.mark.parametrize(
    "extra",
    [
        f"    password: [{SECRET}]\n",
        f"    password: {{x: {SECRET}}}\n",
        f"    password: {SECRET}\n    password: {SECRET}\n",
        f"    password: {SECRET}\n",  # with password_command: two sources
    ],
)
def test_errors_never_show_an_inline_password(tmp_path: Path, extra: str) -> None:
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert SECRET not in str(info.value)


# --------------------------------------------------------------------------
# wants()


def test_default_pattern_takes_everything_including_nested() -> None:
    acct = account()
    for name in ("INBOX", "Sent", "Archive/2024", "a/b/c", "Entwürfe"):
        assert acct.wants(name)


def test_patterns_and_hierarchy() -> None:
    acct = account(mailboxes=("INBOX", "Archive/*", "Lists/?oo"))
    assert acct.wants("INBOX")
    assert acct.wants("Archive/2024")
    assert acct.wants("Archive/2024/Q1")  # * crosses "/"
    assert not acct.wants("Archive")  # the parent itself is not below it
    assert acct.wants("Lists/foo") and not acct.wants("Lists/fooo")
    assert not acct.wants("Sent")
    assert not acct.wants("archive/2024")  # only INBOX is case-insensitive


@pytest.mark.parametrize("spelling", ["INBOX", "inbox", "Inbox", "iNbOx"])
def test_inbox_matches_in_any_case(spelling: str) -> None:
    assert account(mailboxes=("INBOX",)).wants(spelling)
    assert account(mailboxes=(spelling,)).wants("INBOX")
    assert account(mailboxes=("INBOX/*",)).wants(f"{spelling}/Sub")
    assert not account(exclude=(spelling.lower(),)).wants("INBOX")


def test_excludes_win() -> None:
    acct = account(mailboxes=("*",), exclude=("Trash", "Junk", "Archive/*"))
    assert acct.wants("INBOX") and acct.wants("Archive") and acct.wants("trash")
    assert not acct.wants("Trash") and not acct.wants("Junk")
    assert not acct.wants("Archive/2024") and not acct.wants("Archive/2024/Q1")


names = st.lists(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/"), min_size=1),
    min_size=1,
    max_size=4,
).map("/".join)


@given(names)
def test_star_takes_any_name_and_an_exact_exclude_drops_it(name: str) -> None:
    assert account().wants(name)
    assert not account(exclude=(glob.escape(name),)).wants(name)


@given(
    st.lists(st.text("inbxINBX*?/a", max_size=8), min_size=1, max_size=3),
    st.lists(st.text("inbxINBX*?/a", max_size=8), max_size=3),
    # Only a whole first component is INBOX: "INBOXa" is another mailbox.
    st.one_of(st.just(""), st.text("ab/", max_size=5).map(lambda t: "/" + t)),
)
def test_inbox_spelling_never_changes_the_answer(
    mailboxes: list[str], exclude: list[str], rest: str
) -> None:
    acct = account(mailboxes=tuple(mailboxes), exclude=tuple(exclude))
    results = {acct.wants(s + rest) for s in ("INBOX", "inbox", "Inbox")}
    assert len(results) == 1


# --------------------------------------------------------------------------
# Password sources


def test_command_gives_the_first_line_without_its_newline() -> None:
    source = PasswordSource(
        "personal", command=python("print('  pw with spaces  '); print('second')")
    )
    assert source.resolve() == "  pw with spaces  "


def test_command_crlf_is_stripped() -> None:
    source = PasswordSource("p", command=python("import sys; sys.stdout.buffer.write(b'pw\\r\\n')"))
    assert source.resolve() == "pw"


def test_command_gets_no_stdin() -> None:
    code = "import sys; print('pw' if sys.stdin.read() == '' else 'stdin was open')"
    assert PasswordSource("p", command=python(code)).resolve() == "pw"


def test_failing_command_names_the_status_but_not_the_output() -> None:
    code = f"import sys; print({SECRET!r}); print({SECRET!r}, file=sys.stderr); sys.exit(3)"
    with pytest.raises(PasswordError) as info:
        PasswordSource("personal", command=python(code)).resolve()
    message = str(info.value)
    assert "exited with status 3" in message
    assert "account 'personal'" in message and "password_command" in message
    assert SECRET not in message and SECRET not in repr(info.value)


def test_missing_command() -> None:
    with pytest.raises(PasswordError, match="command not found: '/no/such/pass'"):
        PasswordSource("p", command=("/no/such/pass", "show")).resolve()


def test_command_with_no_output() -> None:
    with pytest.raises(PasswordError, match="printed nothing"):
        PasswordSource("p", command=python("print()")).resolve()


@posix_only
def test_command_killed_by_a_signal() -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(PasswordError, match="killed by SIGKILL"):
        PasswordSource("p", command=python(code)).resolve()


def test_command_timeout() -> None:
    with pytest.raises(PasswordError, match="did not finish within 0.5 s"):
        PasswordSource("p", command=python("import time; time.sleep(30)")).resolve(timeout=0.5)


def test_password_file_first_line(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(" pw \nsecond line\n")
    assert PasswordSource("p", file=pw).resolve() == " pw "


@pytest.mark.parametrize(
    ("setup", "expected"),
    [("missing", "no such file"), ("empty", "first line of"), ("dir", "is a directory")],
)
def test_password_file_failures(tmp_path: Path, setup: str, expected: str) -> None:
    pw = tmp_path / "pw"
    if setup == "empty":
        pw.write_text("\nlater\n")
    elif setup == "dir":
        pw.mkdir()
    with pytest.raises(PasswordError, match=expected) as info:
        PasswordSource("personal", file=pw).resolve()
    assert str(info.value).startswith("account 'personal': password_file: ")


def test_inline_password_resolves_but_never_shows() -> None:
    source = PasswordSource("personal", inline=SECRET)
    assert source.resolve() == SECRET
    acct = account(password=source)
    config = Config(Path("/c.yaml"), Path("/s"), (acct,))
    for shown in (repr(source), str(source), repr(acct), str(acct), repr(config)):
        assert SECRET not in shown
    assert str(source) == "<inline password>"
    assert "<inline password>" in repr(acct)


def test_password_source_needs_exactly_one_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PasswordSource("p")
    with pytest.raises(ValueError):
        PasswordSource("p", inline="x", file=tmp_path)
    with pytest.raises(ValueError):
        PasswordSource("p", command=())


@posix_only
@pytest.mark.parametrize(
    ("mode", "warned"), [(0o600, False), (0o640, True), (0o604, True), (0o644, True)]
)
def test_inline_password_in_a_readable_file_warns(tmp_path: Path, mode: int, warned: bool) -> None:
    text = BASE.replace("password_command: [pass, show, mail/personal]", f"password: {SECRET}")
    config = load(tmp_path, text, mode=mode)
    assert config.accounts[0].password.resolve() == SECRET
    if not warned:
        assert config.warnings == ()
        return
    (warning,) = config.warnings
    path = tmp_path / "config.yaml"
    assert warning.startswith(f"{path}:5: accounts.personal.password: account 'personal'")
    assert f"chmod 600 {path}" in warning and "password_command" in warning
    assert SECRET not in warning


@posix_only
def test_command_source_never_warns_about_modes(tmp_path: Path) -> None:
    assert load(tmp_path, BASE, mode=0o644).warnings == ()


@posix_only
def test_readable_password_file_warns(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    pw.chmod(0o644)
    text = BASE.replace("password_command: [pass, show, mail/personal]", f"password_file: {pw}")
    (warning,) = load(tmp_path, text).warnings
    assert "accounts.personal.password_file" in warning and f"chmod 600 {pw}" in warning
    pw.chmod(0o600)
    assert load(tmp_path, text).warnings == ()


def test_password_file_need_not_exist_at_load(tmp_path: Path) -> None:
    text = BASE.replace(
        "password_command: [pass, show, mail/personal]", "password_file: /no/such/pw"
    )
    (acct,) = load(tmp_path, text).accounts
    with pytest.raises(PasswordError, match="no such file"):
        acct.password.resolve()


def test_ca_file_with_tls_none_warns(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    text = BASE.replace("imap.example.org", "localhost") + f"    tls: none\n    ca_file: {ca}\n"
    (warning,) = load(tmp_path, text).warnings
    assert "accounts.personal.ca_file: not used with tls: none" in warning


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("45", 45.0), ("1.5m", 90.0), ("500ms", 0.5 + 59.5)],
)
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    if text == "500ms":
        text, seconds = "60000ms", 60.0
    config = load(tmp_path, BASE + f"    poll_interval: {text}\n")
    assert config.accounts[0].poll_interval == seconds


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("    poll_interval: soon\n", "expected a duration such as 30s, 5m or 1h, got 'soon'"),
        ("    idle_renew: 45m\n", "expected a duration from 10s to 29m"),
        ("    idle_renew: [1]\n", "expected a duration"),
        ("    max_connections: 1\n", "expected an integer from 2 to 1000"),
        ("    workers: 10\n", "workers (10) must be fewer than max_connections (10)"),
        ("    watch: INBOX\n", "expected a list of patterns"),
    ],
)
def test_daemon_setting_errors_name_line_and_key(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, BASE + line)
    assert message in str(caught.value)
    assert caught.value.line == BASE.count("\n") + 1


def test_defaults_for_the_daemon(tmp_path: Path) -> None:
    (acct,) = load(tmp_path, BASE).accounts
    assert acct.watch is None and acct.wants_watched("Anything")
    assert (acct.max_connections, acct.poll_interval, acct.idle_renew) == (10, 60.0, 1200.0)


# --------------------------------------------------------------------------
# compress


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("yes", "yes"), ("no", "no"), ("true", "yes"), ("off", "no"), ('"yes"', "yes")],
)
def test_compress_modes(tmp_path: Path, value: str, expected: str) -> None:
    (acct,) = load(tmp_path, BASE + f"    compress: {value}\n").accounts
    assert acct.compress == expected


def test_compress_defaults_to_auto(tmp_path: Path) -> None:
    (acct,) = load(tmp_path, BASE).accounts
    assert acct.compress == "auto"


def test_compress_rejects_other_values(tmp_path: Path) -> None:
    error = fails(tmp_path, BASE + "    compress: fast\n", 7, "accounts.personal.compress")
    assert "auto, yes, no" in str(error)
