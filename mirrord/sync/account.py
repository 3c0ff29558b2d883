"""One complete sync of every wanted mailbox of one account.

Discovers the mailboxes (NAMESPACE, LIST, the account's patterns), then syncs
them concurrently over the account's worker pool. One mailbox failing does
not stop the others; a refused login stops the account, since every other
attempt would be refused too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer

from mirrord.config import Account
from mirrord.oserrors import explain
from mirrord.pool import Worker, WorkerPool
from mirrord.progress import Progress
from mirrord.protocol.client import ListEntry, MirrordIMAP4Client, Namespace
from mirrord.protocol.early import EarlyConnection
from mirrord.store.maildir import trash_for
from mirrord.store.state import StateDB
from mirrord.sync.folders import MassFolderRemoval, adopt_renamed, set_aside_gone
from mirrord.sync.mailbox import MailboxResult, MailboxSync
from mirrord.sync.names import (
    UnmappableName,
    local_name,
    maildir_path,
    unique_local_names,
    visible,
)
from mirrord.sync.newfolders import create_on_server, folders_to_create
from mirrord.sync.pushing import Pusher, PushFolder
from mirrord.units import plural

log = logging.getLogger("mirrord.sync")


@dataclass(frozen=True)
class MailboxPlan:
    """A server mailbox we will mirror and where it goes."""

    entry: ListEntry
    local_name: str


@dataclass
class Discovery:
    capabilities: frozenset[str]
    namespace: Namespace
    wanted: list[MailboxPlan] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Server mailboxes left out, with the reason."""
    listed: set[str] = field(default_factory=set)
    """The local name of every selectable mailbox of the (complete) LIST, wanted or not."""


@dataclass
class AccountResult:
    account: str
    mailboxes: list[MailboxResult] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(m.error is None for m in self.mailboxes)


def choose_mailboxes(account: Account, entries: list[ListEntry], namespace: Namespace) -> Discovery:
    """Which server mailboxes the account's patterns select, by their local names."""
    discovery = Discovery(frozenset(), namespace)
    seen: dict[str, str] = {}
    mapped: dict[str, str] = {}
    for entry in entries:
        if not entry.selectable:
            continue
        try:
            mapped[entry.name] = local_name(entry.name, entry.delimiter or namespace.delimiter, namespace.prefix)
        except UnmappableName as e:
            discovery.skipped.append(f"{visible(entry.name)}: {e}")
    unique = unique_local_names(mapped.items())  # INBOX.INBOX must not hide INBOX
    for entry in entries:
        if entry.name not in unique:
            continue
        try:
            name = unique[entry.name]
            maildir_path(account.maildir, name)
        except UnmappableName as e:
            discovery.skipped.append(f"{visible(entry.name)}: {e}")
            continue
        discovery.listed.add(name)
        if not account.wants(name):
            continue
        if name in seen:
            discovery.skipped.append(f"{entry.name}: same local name as {seen[name]}")
            continue
        seen[name] = entry.name
        discovery.wanted.append(MailboxPlan(entry, name))
    discovery.wanted.sort(key=lambda p: (p.local_name != "INBOX", p.local_name))
    return discovery


async def discover(pool: WorkerPool, account: Account) -> Discovery:
    async def job(worker: Worker) -> Discovery:
        asked: list[defer.Deferred[Any]] = []

        def ask(client: MirrordIMAP4Client) -> None:
            # Neither depends on the other: one round trip for both.
            with client.pipeline():
                asked.append(defer.Deferred.fromCoroutine(client.namespace()))
                asked.append(defer.Deferred.fromCoroutine(client.list_mailboxes("", "*")))

        try:
            # On a new connection they go out with its ENABLE: the login's
            # last round trip also lists the mailboxes.
            client = await worker.connection(then=ask)
        except BaseException:
            for d in asked:
                d.addErrback(lambda _: None)  # failed with the connection, which is the error
            raise
        if not asked:
            ask(client)
        try:
            namespace, entries = await defer.gatherResults(asked, consumeErrors=True)
        except defer.FirstError as e:
            e.subFailure.raiseException()  # the error itself, for the pool's retry and the log
        discovery = choose_mailboxes(account, entries, namespace)
        discovery.capabilities = client.capabilities
        return discovery

    return await pool.run(job, "listing mailboxes")


def _allowed(account: Account, local_name: str, allow_delete: frozenset[str]) -> bool:
    """Whether ``--allow-delete`` named this mailbox (``ACCOUNT/MAILBOX`` or just ``MAILBOX``)."""
    return f"{account.name}/{local_name}" in allow_delete or local_name in allow_delete


async def sync_account(
    reactor: Any,
    account: Account,
    state: StateDB,
    password: str,
    progress: Progress | None = None,
    allow_delete: frozenset[str] = frozenset(),
    early: EarlyConnection | None = None,
    logging_out: list[defer.Deferred[Any]] | None = None,
) -> AccountResult:
    """Sync every wanted mailbox of ``account`` once; never raises for server trouble.

    ``early``: a connection to the server begun at start-up
    (:mod:`mirrord.protocol.early`), for the first worker. ``logging_out``:
    if given, return once every job has ended and the LOGOUTs are sent,
    leaving here what fires when the server has answered them
    (:meth:`WorkerPool.stop`); else wait for the answers.
    """
    result = AccountResult(account.name)
    # As many connections ahead as there were mailboxes last time: a catch-up
    # of one mailbox logs in once. A first sync (nothing recorded) warms them all.
    recorded = len(state.mailboxes(account.name))
    pool = WorkerPool(reactor, account, password, account.workers, ahead=recorded or None, early=early)
    try:
        discovery = await discover(pool, account)
        for reason in discovery.skipped:
            log.warning("%s: not mirrored: %s", account.name, reason)
        log.info("%s: %s to mirror", account.name, plural(len(discovery.wanted), "mailbox", "mailboxes"))
        set_aside: list[Path] = []
        try:
            set_aside = set_aside_gone(account, state, discovery.listed)
        except MassFolderRemoval as e:
            log.error("%s", e)
            result.error = str(e)
        except OSError as e:
            result.error = f"{account.name}: cannot set aside a folder gone from the server: {_describe(e)}"
            log.error("%s", result.error)
        refused: dict[str, str] = {}
        if account.two_way:
            await add_local_folders(pool, account, state, discovery)
            refused, failed = await _send_local_changes(account, discovery, state, pool, allow_delete)
            if failed:
                result.error = (f"{plural(failed, 'local change')} not sent (see above); "
                                "tried again next run")
        runs: list[defer.Deferred[MailboxResult]] = []
        for plan in discovery.wanted:
            if plan.local_name in refused:
                runs.append(defer.succeed(MailboxResult(account.name, plan.local_name, error=refused[plan.local_name],
                                                        needs_user=True)))
                continue
            runs.append(
                defer.Deferred.fromCoroutine(
                    _sync_one(account, plan, state, pool, progress, _allowed(account, plan.local_name, allow_delete),
                              set_aside)
                )
            )
        outcomes = await defer.DeferredList(runs, consumeErrors=True)
        for plan, (ok, value) in zip(discovery.wanted, outcomes):
            if ok:
                result.mailboxes.append(value)
            else:
                failed = MailboxResult(account.name, plan.local_name, error=_describe(value.value))
                log.error("%s", failed.summary())
                result.mailboxes.append(failed)
    except Exception as e:
        result.error = str(e) or type(e).__name__
        log.error("%s: %s", account.name, result.error)
        log.debug("%s: account sync failed", account.name, exc_info=True)
    finally:
        logged_out = await pool.stop()
        if logging_out is None:
            await logged_out
        else:
            logging_out.append(logged_out)
    return result


async def add_local_folders(pool: WorkerPool, account: Account, state: StateDB, discovery: Discovery) -> None:
    """Two-way: folders a reader made locally are created on the server and join ``discovery``.

    A failure is logged and changes nothing: the folder is tried again next time.
    """
    try:
        names = folders_to_create(account, state, discovery.listed)
        if not names:
            return
        made = await create_on_server(pool, account, state, names, discovery.namespace.delimiter,
                                      discovery.namespace.prefix)
    except Exception as e:  # noqa: BLE001 - the rest of the sync goes on
        log.error("%s: could not create local folders on the server: %s", account.name, _describe(e))
        return
    for entry in made:
        name = local_name(entry.name, entry.delimiter, discovery.namespace.prefix)
        discovery.listed.add(name)
        discovery.wanted.append(MailboxPlan(entry, name))


def push_folders(account: Account, plans: Iterable[MailboxPlan], state: StateDB) -> dict[str, PushFolder]:
    """The folders a two-way round looks at: the wanted mailboxes."""
    return {
        plan.local_name: PushFolder(
            plan.local_name, plan.entry.raw_name, maildir_path(account.maildir, plan.local_name),
            trash_for(state.path.parent, "trash", account.name, plan.local_name, account.trash_days),
        )
        for plan in plans
    }


async def _send_local_changes(
    account: Account, discovery: Discovery, state: StateDB, pool: WorkerPool, allow_delete: frozenset[str]
) -> tuple[dict[str, str], int]:
    """``run --once``'s first step: local changes go up before the server's come down.

    Returns the folders the round refused (a mass disappearance), with why
    (they are not synced this run), and how many changes the server refused.
    A failed round is logged and the pulls go
    on: they revert nothing (two-way pulls leave local changes alone), and
    the next run sends what this one could not.
    """
    pusher = Pusher(account, state, pool, push_folders(account, discovery.wanted, state),
                    allow_delete=lambda name: _allowed(account, name, allow_delete))
    try:
        result = await pusher.round()
    except Exception as e:
        log.error("%s: could not send local changes: %s", account.name, _describe(e))
        log.debug("%s: two-way round failed", account.name, exc_info=True)
        return {}, 1
    return {
        name: (f"local changes not sent: {why}; nothing was deleted on the server. If you did delete them, "
               f"allow it once: `mirrord run --once --allow-delete {account.name}/{name}`")
        for name, why in result.refused.items()
    }, result.failed


def _describe(error: BaseException) -> str:
    """An error as one line for the log: an OSError with the path it concerns."""
    if isinstance(error, OSError) and error.strerror:
        return explain(error)
    return str(error) or type(error).__name__


async def _sync_one(
    account: Account,
    plan: MailboxPlan,
    state: StateDB,
    pool: WorkerPool,
    progress: Progress | None,
    allow_delete: bool,
    set_aside: list[Path] = [],  # noqa: B006 - read only
) -> MailboxResult:
    """One mailbox's sync, from setting up its Maildir to the end.

    Setting up is inside: a local folder that cannot be made (a name too
    long for the file system, a file where its directory should be) is
    that mailbox's failure, reported with its name; the others go on.
    """
    try:
        sync = MailboxSync.for_account(
            account, plan.entry, plan.local_name, state, pool, progress=progress, allow_delete=allow_delete
        )
    except Exception as e:
        failed = MailboxResult(account.name, plan.local_name, error=f"cannot set up its local folder: {_describe(e)}")
        log.error("%s", failed.summary())
        log.debug("%s/%s: setup failed", account.name, plan.local_name, exc_info=True)
        return failed
    if set_aside and state.mailbox(account.name, plan.local_name) is None:
        try:
            await adopt_renamed(sync, set_aside)
        except Exception as e:  # noqa: BLE001 - only a shortcut: the sync fetches what was not moved in
            log.warning("%s/%s: could not match set-aside copies: %s", account.name, plan.local_name, e)
    return await sync.run()
