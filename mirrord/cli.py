"""The ``mirrord`` command line: run, run --once, check, status, demo.

Exit status: 0 when everything asked for worked, 2 for a bad config file or
bad usage (nothing was done), 1 for anything else (a server refused, a
mailbox failed). Scripts and systemd rely on these; keep them stable.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from mirrord import __version__
from mirrord.config import Account, Config, ConfigError, PasswordError, default_config_path, load_config
from mirrord.logs import route_twisted_logs, setup_logging
from mirrord.oserrors import explain
from mirrord.progress import Progress, TerminalProgress

log = logging.getLogger("mirrord")

# Twisted (its reactor, TLS) is imported inside the commands that talk to a
# server: `status`, `init`, `--version`, `--help` and a config error start in
# a fraction of the time without it (tests/unit/test_cli_imports.py).

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2



class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 already; keep its message
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"mirrord: error: {message}\n")


def _home_relative(path: Path) -> str:
    """``~/.config/...`` rather than ``/home/me/.config/...``: what help text shows."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


_FIRST_HOUR = """\
the first hour:
  mirrord demo                   see it work on a private, throwaway server
  mirrord init                   write a commented config to edit
  mirrord check                  test it: log in, list what would be mirrored
  mirrord run --once             the first copy, with progress
  mirrord install-service        run it as a systemd user service
  mirrord status                 what is mirrored, and how the last run ended

Each command has its own --help. Exit status: 0 all worked, 2 bad config or
usage (nothing was done), 1 anything else (the log says what).
"""


COMMANDS = ("run", "check", "status", "init", "install-service", "demo")


def named_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, if nothing but ``-v`` and ``-c FILE`` come before it; else None.

    Exactly where argparse would find it too, for those forms; anything
    else (an abbreviated option, ``--help``) gets None and the full parser.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-v", "--verbose"):
            i += 1
        elif arg in ("-c", "--config"):
            i += 2
        elif (arg.startswith("-c") and len(arg) > 2) or arg.startswith("--config="):
            i += 1
        else:
            return arg if arg in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; every subcommand says what it does and shows an example.

    ``-c`` and ``-v`` are accepted before and after the subcommand, as
    people type them either way. ``demo`` takes no ``-c``: it writes its
    own config.

    ``only``: the subcommand the arguments name (:func:`named_command`):
    the others are left bare (their one-line summary is all that parsing
    ``only``'s arguments can show), which saves a millisecond of every
    start, most of what argparse takes to build them all.
    """
    config_default = _home_relative(default_config_path())
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="protocol trace (credentials redacted)")
    common = argparse.ArgumentParser(add_help=False, parents=[verbose])
    # SUPPRESS keeps a value given before the subcommand from being
    # overwritten by the subparser's default.
    common.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help=f"config file (default: {config_default})")
    raw = argparse.RawDescriptionHelpFormatter

    parser = _Parser(prog="mirrord", description="Keep a local Maildir an exact copy of IMAP mailboxes.",
                     parents=[common], epilog=_FIRST_HOUR, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"mirrord {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                title="commands")

    def command(name: str, parents: list[argparse.ArgumentParser], summary: str, description: str,
                examples: str) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return sub.add_parser(name, help=summary, add_help=False)
        description = textwrap.fill(description, 78)
        return sub.add_parser(name, parents=parents, help=summary, description=description,
                              epilog="examples:\n" + examples, formatter_class=raw)

    run = command(
        "run", [common], "mirror and keep watching, or sync once with --once",
        "Without --once: the daemon. It catches up every mailbox, then keeps them current with IDLE "
        "(or polling) until stopped; SIGHUP re-reads the config. With --once: one complete sync, then exit.",
        "  mirrord run --once                       sync every mailbox once\n"
        "  mirrord run --once personal/INBOX        sync one mailbox, leave the others alone\n"
        "  mirrord run --once work 'personal/Lists/*'\n"
        "                                           one whole account, some mailboxes of another\n"
        "  mirrord run                              keep mirroring (as the systemd service does)\n"
        "  mirrord run --once --allow-delete personal/INBOX\n"
        "                                           let this sync remove what the server removed\n",
    )
    run.add_argument("--once", action="store_true", help="one complete sync of every mailbox, then exit")
    run.add_argument("targets", nargs="*", metavar="ACCOUNT[/MAILBOX]",
                     help="with --once: sync only these accounts, or these mailboxes of an account "
                          "(a name or a pattern such as personal/Archive/*), like mbsync's channel:box")
    run.add_argument("--allow-delete", action="append", default=[], metavar="MAILBOX",
                     help="with --once: let this sync remove more of MAILBOX (ACCOUNT/MAILBOX) than "
                          "max_delete allows; may be given more than once")
    command(
        "check", [common], "test the config: log in, list, write nothing",
        "Validates the config, connects and logs in to every account, prints the server's capabilities "
        "and the mailboxes that would be mirrored, and makes sure each maildir and the state dir can be "
        "written (it leaves nothing behind).",
        "  mirrord check\n  mirrord -c ~/.config/mirrord/work.yaml check\n",
    )
    status = command(
        "status", [common], "what is mirrored, and how the last run ended",
        "Messages, last change and what the daemon is doing, per mailbox; with no daemon running, how "
        "the last `run --once` ended, failures first. Reads only.",
        "  mirrord status\n  mirrord status --json | jq '.mailboxes[] | select(.last_error)'\n",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    command(
        "init", [common], "write a commented config to start from",
        f"Writes the commented example config to {config_default} (or the file -c names), 0600, and "
        "says which keys to edit. An existing file is left alone.",
        "  mirrord init\n  mirrord -c ~/.config/mirrord/work.yaml init\n",
    )
    install = command(
        "install-service", [common], "install the systemd user service for this mirrord",
        "Writes mirrord.service and mirrord@.service into ~/.config/systemd/user/ with ExecStart= "
        "naming this mirrord by its absolute path (a virtualenv, pipx or pip --user install alike), "
        "and -c FILE if given. Running it again rewrites them; a unit it did not write is left alone "
        "unless --force. Then enable it with systemctl --user.",
        "  mirrord install-service && systemctl --user enable --now mirrord\n"
        "  mirrord -c ~/.config/mirrord/work.yaml install-service\n",
    )
    install.add_argument("--force", action="store_true", help="replace units this command did not write")
    demo = command(
        "demo", [verbose], "see it work: mirror a private, throwaway Dovecot",
        "Starts a private Dovecot on 127.0.0.1 with sample mail, mirrors it once, then runs the daemon "
        "while a few messages arrive and shows their latency. Nothing leaves the machine; it writes its "
        "own config, so -c does not apply.",
        "  mirrord demo\n  mirrord demo --dir /tmp/mirrord-demo --live 0\n",
    )
    demo.add_argument("--dir", type=Path, default=None, help="keep the demo's files here (default: a temp dir)")
    demo.add_argument("--live", type=int, default=5, metavar="N",
                      help="messages to send while the daemon watches (default 5; 0 to skip)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(named_command(argv)).parse_args(argv)
    verbose = getattr(args, "verbose", False)
    setup_logging(verbose, twisted=False)
    if args.command == "demo":
        from mirrord.demo import run_demo

        if getattr(args, "config", None) is not None:
            print("mirrord: error: demo writes its own config; -c does not apply to it", file=sys.stderr)
            return EXIT_USAGE

        return run_demo(args.dir, verbose=verbose, live=args.live)
    config_path: Path = getattr(args, "config", None) or default_config_path()
    if args.command == "install-service":
        from mirrord.firstrun import InitError, install_service

        try:
            print(install_service(getattr(args, "config", None), force=args.force), end="")
        except InitError as e:
            print(f"mirrord: {e}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    if args.command == "init":
        from mirrord.firstrun import InitError, init_config

        try:
            print(init_config(config_path), end="")
        except InitError as e:
            print(f"mirrord: {e}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"mirrord: {e}", file=sys.stderr)
        if e.message.endswith("no such file"):
            from mirrord.firstrun import config_option

            print(f"mirrord: no config yet? `mirrord {config_option(config_path)}init` writes a commented "
                  "one to start from", file=sys.stderr)
        return EXIT_USAGE
    for warning in config.warnings:
        log.warning("%s", warning)
    if args.command == "check":
        return check(config)
    if args.command == "status":
        return status(config, as_json=args.json)
    if args.allow_delete and not args.once:
        print("mirrord: error: --allow-delete goes with --once (stop the daemon first)", file=sys.stderr)
        return EXIT_USAGE
    if args.targets and not args.once:
        print("mirrord: error: ACCOUNT/MAILBOX goes with --once (the daemon mirrors every mailbox)",
              file=sys.stderr)
        return EXIT_USAGE
    if args.targets:
        try:
            config = narrow(config, args.targets)
        except ValueError as e:
            print(f"mirrord: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    if not args.once:
        return run(config, once=False)
    without_tls(config)
    # The servers greet while Twisted is imported (mirrord.protocol.early).
    from mirrord.protocol.early import begin_all, close_all

    early = begin_all(config.accounts)
    try:
        return run_once(config, frozenset(args.allow_delete), early)
    finally:
        close_all(early)


def without_tls(config: Config) -> bool:
    """Keep the TLS stack out of a one-shot run whose accounts all use ``tls: none``.

    Twisted's reactor imports pyOpenSSL (and with it cryptography and
    service_identity) whether or not a connection will use it: 35 ms of a
    start-up's CPU, for accounts that the config allows only on loopback.
    Marked absent, Twisted goes without it (its TLS support is optional),
    and mirrord imports it only for an account that needs it
    (``protocol.connect.tls_options``), which this run has none of. Only
    in a process that has not imported Twisted yet: one that has may be
    about to use TLS. Returns whether it did.
    """
    if not config.accounts or any(account.tls != "none" for account in config.accounts):
        return False
    if any(name in sys.modules for name in ("twisted.internet.reactor", "twisted.internet.tcp", "OpenSSL")):
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # an import of it raises ImportError
    return True


def entry() -> None:
    """The ``mirrord`` command (and ``python -m mirrord``): :func:`main`, then a quick exit.

    Tearing down an interpreter that imported Twisted, its TLS stack and
    ours (some 500 modules) takes ~45 ms, a sixth of a whole catch-up, and
    does nothing a finished command needs: its files are closed, its state
    committed, its locks released before :func:`main` returns. So exit at
    once, after what a normal exit does that matters: the atexit handlers
    (logging's flush among them) and flushing stdout and stderr. If a
    non-daemon thread still runs, exit normally, which waits for it.
    """
    status = main()
    exit_quickly(status)


def exit_quickly(status: int) -> None:
    """Exit with ``status`` without the interpreter's teardown; see :func:`entry`."""
    import atexit
    import os
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if others or run_exitfuncs is None:
        raise SystemExit(status)
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            if status == EXIT_OK:
                status = 120  # what Python exits with when flushing stdout fails
    os._exit(status)


def narrow(config: Config, targets: Sequence[str]) -> Config:
    """The config limited to ``targets`` (``ACCOUNT`` or ``ACCOUNT/MAILBOX``), in config order.

    Raises ValueError naming an account the config does not have.
    """
    import dataclasses
    import difflib

    from mirrord.config import NarrowedAccount

    names = [a.name for a in config.accounts]
    whole: set[str] = set()
    some: dict[str, list[str]] = {}
    for target in targets:
        account, _, mailbox = target.partition("/")
        if account not in names:
            close = difflib.get_close_matches(account, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (accounts: {', '.join(names)})"
            raise ValueError(f"no account {account!r} in {config.path}{hint}")
        if mailbox:
            some.setdefault(account, []).append(mailbox)
        else:
            whole.add(account)
    accounts = tuple(
        a if a.name in whole else NarrowedAccount.of(a, some[a.name])
        for a in config.accounts
        if a.name in whole or a.name in some
    )
    return dataclasses.replace(config, accounts=accounts)


# -- run ------------------------------------------------------------------------


def run(config: Config, *, once: bool, allow_delete: frozenset[str] = frozenset()) -> int:
    """``mirrord run`` and ``mirrord run --once``."""
    if once:
        return run_once(config, allow_delete)
    from twisted.internet import defer, task

    from mirrord.locks import LockHeld
    from mirrord.service import Service

    route_twisted_logs()

    outcome = {"status": EXIT_OK}

    async def main(reactor: Any) -> None:
        try:
            service = Service(reactor, config)
        except OSError as e:
            log.error("%s", explain(e, "cannot open the state database"))
            outcome["status"] = EXIT_FAILURE
            return
        try:
            service.enable_status_file()
        except Exception as e:  # noqa: BLE001 - status is a convenience, mirroring is not
            log.warning("no status file for `mirrord status`: %s", e)

        async def shutdown() -> None:
            await service.stop()
            # Let the reactor go on with shutdown from a fresh call stack, not
            # from inside the last LOGOUT's response handling: its closing of
            # every connection would re-enter Twisted's TLS wrapper there.
            await task.deferLater(reactor, 0, lambda: None)

        try:
            await service.start()
        except (LockHeld, OSError) as e:
            log.error("%s", explain(e, "cannot take the account locks") if isinstance(e, OSError) else e)
            outcome["status"] = EXIT_FAILURE
            service.state.close()
            return
        # SIGTERM and SIGINT stop the reactor; this runs first and is waited
        # for, so writes in progress finish and connections log out.
        reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.Deferred.fromCoroutine(shutdown()))
        service.install_signal_handlers()
        await defer.Deferred()  # until the reactor stops

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_FAILURE
    return outcome["status"]


def run_once(config: Config, allow_delete: frozenset[str] = frozenset(), early: dict[str, Any] | None = None) -> int:
    """One complete sync of every mailbox of every account, then exit.

    ``early``: connections begun at start-up, by account name
    (:func:`mirrord.protocol.early.begin_all`), each for its account's first worker.
    """
    import gc

    from twisted.internet import defer, task, threads

    from mirrord.locks import LockHeld, lock_accounts
    from mirrord.status import STATE_DB_NAME, RunOutcome, write_last_run
    from mirrord.store.state import StateDB
    from mirrord.sync.account import sync_account

    route_twisted_logs()

    try:
        locks = lock_accounts(config, list(config.accounts))
    except LockHeld as e:
        log.error("%s", e)
        return EXIT_FAILURE
    except OSError as e:
        log.error("%s", explain(e, "cannot take the account locks"))
        return EXIT_FAILURE
    try:
        state = StateDB(config.state_dir / STATE_DB_NAME)
    except OSError as e:
        for lock in locks.values():
            lock.release()
        log.error("%s", explain(e, "cannot open the state database"))
        return EXIT_FAILURE
    outcome = {"ok": True}
    progress = Progress()
    outcomes: list[RunOutcome] = []
    terminal: TerminalProgress | None = None
    if sys.stderr.isatty():
        terminal = TerminalProgress(progress, sys.stderr)
        for handler in logging.getLogger().handlers:
            terminal.attach(handler)

    async def main(reactor: Any) -> None:
        if terminal is not None:
            ticker = task.LoopingCall(terminal.render)
            ticker.start(0.5, now=False)
            reactor.addSystemEventTrigger("before", "shutdown", lambda: ticker.running and ticker.stop())
        ok = True
        passwords: dict[str, str] = {}
        for account in config.accounts:
            try:
                # A password command may wait on a pinentry prompt: keep it off the reactor.
                # An inline password or a file needs no thread (nor the reactor's thread pool,
                # whose start and stop a catch-up of a few milliseconds would notice).
                if account.password.command is None:
                    passwords[account.name] = account.password.resolve_once()
                else:
                    passwords[account.name] = await threads.deferToThread(account.password.resolve_once)
            except PasswordError as e:
                log.error("%s", e)
                ok = False
                outcomes.append(RunOutcome(account.name, None, time.time(), str(e)))
        logging_out: list[defer.Deferred[Any]] = []
        results = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(
                    sync_account(reactor, account, state, passwords[account.name], progress, allow_delete,
                                 early=(early or {}).get(account.name), logging_out=logging_out)
                )
                for account in config.accounts
                if account.name in passwords
            ]
        )
        outcome["ok"] = ok and all(r.ok for r in results)
        for result in results:
            if not _found_every_named_mailbox(config, result):
                outcome["ok"] = False
        finished = time.time()
        for result in results:
            outcomes.append(RunOutcome(result.account, None, finished, result.error))
            outcomes.extend(RunOutcome(m.account, m.mailbox, finished, m.error) for m in result.mailboxes)
        # Every job has ended and the LOGOUTs are out: close the state (its
        # checkpoint) and note the outcome while the servers answer them.
        record()
        await defer.DeferredList(logging_out, consumeErrors=True)

    recorded: list[bool] = []

    def record() -> None:
        """Close the state DB and note this run's outcome for `mirrord status`; once."""
        if recorded:
            return
        recorded.append(True)
        state.close()
        if outcomes:
            try:
                write_last_run(config.state_dir, outcomes)
            except OSError as e:
                log.warning("%s", explain(e, "cannot record this run's outcome for `mirrord status`"))

    # What start-up made (modules, classes, the config: some 50,000 objects)
    # lives to the end; frozen, the collector no longer walks it each time a
    # first sync's per-message garbage sets off a collection (a 10,000-message
    # first sync: 20 ms of its CPU).
    gc.freeze()
    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_FAILURE
    finally:
        if terminal is not None:
            terminal.clear()
        record()
        for lock in locks.values():
            lock.release()
    return EXIT_OK if outcome["ok"] else EXIT_FAILURE


def _found_every_named_mailbox(config: Config, result: Any) -> bool:
    """False (and said) if ``run --once ACCOUNT/MAILBOX`` named a mailbox that no synced one matches."""
    import fnmatch

    from mirrord.config import NarrowedAccount

    account = next((a for a in config.accounts if a.name == result.account), None)
    if not isinstance(account, NarrowedAccount) or result.error:
        return True
    synced = [m.mailbox for m in result.mailboxes]
    found = True
    for pattern in account.only:
        if not any(fnmatch.fnmatchcase(name.upper() if name.upper() == "INBOX" else name,
                                       pattern.upper() if pattern.upper() == "INBOX" else pattern)
                   for name in synced):
            log.error("%s/%s: no such mailbox among those the config mirrors (`mirrord check` lists them)",
                      account.name, pattern)
            found = False
    return found


# -- check ----------------------------------------------------------------------


def check(config: Config, out: TextIO | None = None) -> int:
    """Connect and log in to every account, and show what would be mirrored."""
    from twisted.internet import defer, task, threads

    from mirrord.protocol.connect import open_session
    from mirrord.sync.account import choose_mailboxes
    from mirrord.sync.names import maildir_path, visible

    route_twisted_logs()
    out = out or sys.stdout
    outcome = {"ok": True}

    async def check_account(reactor: Any, account: Account) -> None:
        print(f"account {account.name}: {account.username} at {account.host}:{account.port} ({account.tls})",
              file=out)
        try:
            password = await threads.deferToThread(account.password.resolve_once)
            client = await open_session(reactor, account, password, label=f"{account.name} check")
        except Exception as e:  # noqa: BLE001 - reported per account
            print(f"  FAILED: {e}", file=out)
            outcome["ok"] = False
            return
        try:
            print(f"  logged in with {client.auth_mechanism}", file=out)
            print(f"  capabilities: {' '.join(sorted(client.capabilities))}", file=out)
            namespace = await client.namespace()
            entries = await client.list_mailboxes("", "*")
            discovery = choose_mailboxes(account, entries, namespace)
            print(f"  mailboxes to mirror ({len(discovery.wanted)}):", file=out)
            for plan in discovery.wanted:
                print(f"    {visible(plan.entry.name)}  ->  {visible(str(maildir_path(account.maildir, plan.local_name)))}", file=out)
            for reason in discovery.skipped:
                print(f"  not mirrored: {visible(reason)}", file=out)
        except Exception as e:  # noqa: BLE001
            print(f"  FAILED: {e}", file=out)
            outcome["ok"] = False
        finally:
            await client.logout()

    def check_writable(what: str, folder: Path) -> None:
        from mirrord.oserrors import probe_writable

        problem = probe_writable(folder)
        if problem is None:
            print(f"  {what} {folder}: can create and rename files there", file=out)
        else:
            print(f"  FAILED: {what} {folder}: {problem}", file=out)
            outcome["ok"] = False

    async def main(reactor: Any) -> None:
        print("state", file=out)
        check_writable("state_dir", config.state_dir)
        for account in config.accounts:
            await check_account(reactor, account)
            check_writable("maildir", account.maildir)

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_FAILURE
    return EXIT_OK if outcome["ok"] else EXIT_FAILURE


# -- status ---------------------------------------------------------------------


def status(config: Config, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """What is mirrored, per mailbox, from the running daemon and the state DB; reads only."""
    from mirrord.status import render_status

    return render_status(config, as_json=as_json, out=out or sys.stdout)
