"""Tests for the two-way decisions (mirrord.sync.twoway).

Example tests pin each rule on a small case. The model-based test drives a
small in-memory server (three folders, UIDs, flags with modseqs, UNCHANGEDSINCE,
MOVE with COPYUID) and an in-memory Maildir plus state rows through random
interleavings of reader and server changes, including server changes that
land between a plan and its execution, applying every plan the way the
wiring will. It demands that the two sides converge (same messages, same
representable flags), that nothing is duplicated, and that nothing is lost
that no one deleted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from mirrord.flags import Flags, flags_from_info, maildir_info
from mirrord.store.maildir import LocalFile
from mirrord.store.state import MessageRecord
from mirrord.sync.twoway import (
    DELETE_FLOOR,
    Adopt,
    Append,
    Folder,
    LocalFlags,
    Move,
    Rekey,
    StoreFlags,
    identity_request,
    merge_flags,
    plan_round,
    settle_move,
)

SEEN, FLAGGED, ANSWERED, DELETED, DRAFT = "\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft"
LETTERS = "DFRST"


def fs(*flags: str) -> Flags:
    return frozenset(flags)


def lf(key: str, letters: str = "", subdir: str | None = None) -> LocalFile:
    subdir = subdir or ("cur" if letters else "new")
    name = f"{key}:2,{letters}" if subdir == "cur" or letters else key
    return LocalFile(subdir, name, flags_from_info(letters))


def row(uid: int, key: str, *flags: str) -> MessageRecord:
    return MessageRecord(uid, key, frozenset(flags), 100)


def one(folder: Folder, **kw: Any):
    return plan_round({"A": folder}, **kw).folders["A"]


# --------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------


def test_local_flag_change_goes_to_the_server() -> None:
    p = one(Folder({1: row(1, "k")}, {"k": lf("k", "S")}, {1: fs()}, complete=True))
    assert p.store == (StoreFlags(1, fs(SEEN), fs()),)
    assert p.local_flags == ()
    assert p.base == {1: fs(SEEN)}


def test_server_flag_change_goes_to_the_file_and_keywords_stay() -> None:
    p = one(Folder({1: row(1, "k", SEEN)}, {"k": lf("k", "S")}, {1: fs(SEEN, FLAGGED, "$Junk")}, complete=True))
    assert p.store == ()
    assert p.local_flags == (LocalFlags(1, "k", fs(SEEN, FLAGGED)),)
    assert p.base == {1: fs(SEEN, FLAGGED, "$Junk")}


def test_both_sides_change_different_flags_and_both_changes_survive() -> None:
    p = one(Folder({1: row(1, "k", "$Junk")}, {"k": lf("k", "S")}, {1: fs(FLAGGED, "$Junk")}, complete=True))
    assert p.store == (StoreFlags(1, fs(SEEN), fs()),)
    assert p.local_flags == (LocalFlags(1, "k", fs(SEEN, FLAGGED)),)
    assert p.base == {1: fs(SEEN, FLAGGED, "$Junk")}


def test_same_change_on_both_sides_sends_nothing() -> None:
    p = one(Folder({1: row(1, "k")}, {"k": lf("k", "S")}, {1: fs("\\SEEN")}, complete=True))
    assert p.store == () and p.local_flags == ()
    assert p.conflicts == ()


def test_new_to_cur_without_letters_is_not_a_flag_change() -> None:
    p = one(Folder({1: row(1, "k")}, {"k": lf("k", "", subdir="cur")}, {1: fs("\\Recent")}, complete=True))
    assert p.is_empty


def test_recent_and_spelling_are_ignored() -> None:
    p = one(Folder({1: row(1, "k", "\\seen")}, {"k": lf("k", "S")}, {1: fs(SEEN, "\\Recent")}, complete=True))
    assert p.is_empty


@given(
    base=st.sets(st.sampled_from(LETTERS)),
    local=st.sets(st.sampled_from(LETTERS)),
    server=st.sets(st.sampled_from(LETTERS)),
    keywords=st.sets(st.sampled_from(["$Junk", "$Forwarded", "work"])),
)
def test_merge_is_a_per_flag_three_way_merge(base: set[str], local: set[str], server: set[str], keywords: set[str]) -> None:
    as_flags = lambda letters: flags_from_info("".join(letters))  # noqa: E731
    m = merge_flags(as_flags(base), as_flags(local), as_flags(server) | keywords)
    for letter in LETTERS:
        flag = next(iter(flags_from_info(letter)))
        b, l_, s = letter in base, letter in local, letter in server
        expected = l_ if s == b else s
        assert (flag in m.flags) == expected
    assert m.base == m.flags | keywords
    assert m.add == m.flags - as_flags(server) and m.remove == as_flags(server) - m.flags
    # Applying the result to either side gives the merge, and merging again is a no-op.
    again = merge_flags(m.base, m.flags, m.base)
    assert not again.add and not again.remove and again.flags == m.flags


# --------------------------------------------------------------------------
# Deletions and their guards
# --------------------------------------------------------------------------


def test_local_deletion_deletes_on_the_server_per_policy() -> None:
    folder = Folder({1: row(1, "k"), 2: row(2, "j")}, {"j": lf("j")}, {1: fs(), 2: fs()}, complete=True)
    p = one(folder)
    assert p.delete == (1,) and p.expunge and p.base == {}
    p = one(folder, policy="flag")
    assert p.delete == (1,) and not p.expunge and p.base == {1: fs(DELETED)}
    p = one(folder, policy="keep")
    assert p.delete == () and p.refetch == (1,)


def test_flag_policy_leaves_a_tombstone_that_is_neither_fetched_nor_deleted_again() -> None:
    folder = Folder({1: row(1, "k", DELETED)}, {}, {1: fs(DELETED)}, complete=True)
    p = one(folder, policy="flag")
    assert p.tombstones == (1,) and p.delete == () and p.refetch == ()
    # Switching to expunge later expunges it; undeleted on the server, it comes back.
    assert one(folder).delete == (1,)
    back = one(Folder({1: row(1, "k", DELETED)}, {}, {1: fs()}, complete=True), policy="flag")
    assert back.refetch == (1,)


def test_deleted_locally_but_changed_on_the_server_is_kept() -> None:
    p = one(Folder({1: row(1, "k")}, {}, {1: fs(FLAGGED)}, complete=True))
    assert p.delete == () and p.refetch == (1,)
    assert [c.uid for c in p.conflicts] == [1]


def _many(n: int, present: int) -> Folder:
    rows = {uid: row(uid, f"k{uid}") for uid in range(1, n + 1)}
    files = {f"k{uid}": lf(f"k{uid}") for uid in range(1, present + 1)}
    return Folder(rows, files, {uid: fs() for uid in rows}, complete=True)


def test_mass_disappearance_refuses_the_folder() -> None:
    p = one(_many(20, 5), max_delete=0.5)
    assert p.refused and "15 of its 20" in p.refused
    assert p.delete == () and p.refetch == ()
    assert one(_many(20, 5), max_delete=0.8).delete == tuple(range(6, 21))


def test_small_deletions_pass_below_the_floor_even_when_all_go() -> None:
    p = one(_many(DELETE_FLOOR, 0), max_delete=0.1)
    assert p.refused is None and len(p.delete) == DELETE_FLOOR
    assert one(_many(DELETE_FLOOR + 1, 0), max_delete=0.1).refused


def test_missing_directories_refuse_the_folder_unless_allowed() -> None:
    folder = Folder({1: row(1, "k")}, None, {1: fs()}, complete=True)
    assert one(folder).refused == "its new/ or cur/ directory is missing"
    allowed = Folder({1: row(1, "k")}, None, {1: fs()}, complete=True, allow_delete=True)
    assert one(allowed).delete == (1,)
    # allow_delete also lifts the share guard
    big = _many(20, 0)
    assert one(Folder(big.rows, big.files, big.server, complete=True, allow_delete=True)).delete == tuple(range(1, 21))


# --------------------------------------------------------------------------
# New files, renames, moves, content changes
# --------------------------------------------------------------------------


def test_new_local_file_is_appended_with_its_flags() -> None:
    p = one(Folder({}, {"n": lf("n", "FS")}, {}, complete=True))
    assert p.append == (Append("n", fs(FLAGGED, SEEN)),)


def test_identities_are_asked_only_when_something_both_vanished_and_appeared() -> None:
    assert identity_request({"A": Folder({1: row(1, "k")}, {}, {})}) == (set(), set(), set())
    new, gone, unknown = identity_request(
        {"A": Folder({1: row(1, "k")}, {}, {}), "B": Folder({}, {"n": lf("n")}, {5: fs()})}
    )
    assert new == {("B", "n")} and gone == {("A", 1)} and unknown == {("B", 5)}


def test_a_new_file_the_server_already_has_is_adopted_not_appended() -> None:
    folder = Folder({}, {"n": lf("n", "S")}, {9: fs(FLAGGED, "$Junk")}, complete=True)
    p = plan_round({"A": folder}, new_identity={("A", "n"): "x"}, server_identity={("A", 9): "x"}).folders["A"]
    assert p.append == () and p.adopt == (Adopt(9, "n", fs(FLAGGED), fs(FLAGGED, "$Junk")),)


def test_rename_in_the_same_folder_rekeys_and_sends_nothing() -> None:
    folder = Folder({1: row(1, "old")}, {"new": lf("new", "", "cur")}, {1: fs()}, complete=True)
    p = plan_round({"A": folder}, new_identity={("A", "new"): "x"}, gone_identity={("A", 1): "x"}).folders["A"]
    assert p.rekey == (Rekey(1, "old", "new"),)
    assert p.append == () and p.delete == () and p.store == ()


def test_move_between_folders_is_a_move_not_an_upload() -> None:
    folders = {
        "A": Folder({7: row(7, "k", "$Junk")}, {}, {7: fs(FLAGGED, "$Junk")}, complete=True),
        "B": Folder({}, {"m": lf("m", "S")}, {}, complete=True),
    }
    plan = plan_round(folders, new_identity={("B", "m"): "x"}, gone_identity={("A", 7): "x"})
    assert plan.moves == (Move("A", 7, "B", "m", fs(SEEN, FLAGGED), fs(SEEN), fs(), fs(SEEN, FLAGGED, "$Junk")),)
    assert plan.folders["A"].is_empty and plan.folders["B"].is_empty


def test_move_from_a_refused_folder_is_held() -> None:
    big = _many(20, 0)
    folders = {"A": big, "B": Folder({}, {"m": lf("m")}, {}, complete=True)}
    plan = plan_round(folders, new_identity={("B", "m"): "x"}, gone_identity={("A", 3): "x"})
    assert plan.folders["A"].refused and plan.moves == ()
    assert plan.folders["B"].held == ("m",) and plan.folders["B"].append == ()


def test_moved_locally_while_expunged_on_the_server_ends_in_the_target_only() -> None:
    folders = {
        "A": Folder({7: row(7, "k")}, {}, {}, complete=True),
        "B": Folder({}, {"m": lf("m")}, {}, complete=True),
    }
    plan = plan_round(folders, new_identity={("B", "m"): "x"}, gone_identity={("A", 7): "x"})
    assert plan.moves == ()
    assert plan.folders["A"].remove_local == (7,)
    assert plan.folders["B"].append == (Append("m", fs()),)


def test_a_move_whose_source_went_meanwhile_does_nothing_and_asks_for_another_round() -> None:
    move = Move("A", 7, "B", "m", fs(SEEN), fs(SEEN), fs(), fs(SEEN))
    assert settle_move(move, {7: 42}).new_uid == 42
    gone = settle_move(move, {})
    assert gone.source_gone and gone.new_uid is None and gone.append is None
    assert settle_move(move, None).unknown


def test_renamed_then_expunged_on_the_server_removes_the_renamed_file() -> None:
    folder = Folder({1: row(1, "old")}, {"new": lf("new")}, {}, complete=True)
    p = plan_round({"A": folder}, new_identity={("A", "new"): "x"}, gone_identity={("A", 1): "x"}).folders["A"]
    assert p.remove_local == (1,) and p.remove_files == ("new",) and p.append == ()


def test_server_expunge_beats_a_local_flag_change() -> None:
    p = one(Folder({1: row(1, "k")}, {"k": lf("k", "F")}, {}, expunged=frozenset({1})))
    assert p.remove_local == (1,) and p.store == ()
    assert [c.uid for c in p.conflicts] == [1]


def test_changed_content_is_uploaded_as_new_and_the_old_deleted() -> None:
    folder = Folder({1: row(1, "k", "$Junk")}, {"k": lf("k", "S")}, {1: fs("$Junk")}, complete=True,
                    changed_content=frozenset({1}))
    p = one(folder)
    assert p.append == (Append("k", fs(SEEN, "$Junk"), replaces=1),)
    assert p.forget == (1,) and p.delete == (1,)
    # Expunged on the server meanwhile: still uploaded, nothing to delete.
    gone = Folder(folder.rows, folder.files, {}, complete=True, changed_content=frozenset({1}))
    p = one(gone)
    assert p.append == (Append("k", fs(SEEN)),) and p.forget == (1,) and p.delete == () and p.remove_local == ()


def test_partial_server_view_takes_unnamed_uids_as_unchanged() -> None:
    folder = Folder({1: row(1, "k", SEEN), 2: row(2, "j")}, {"k": lf("k", ""), "j": lf("j")}, {}, complete=False)
    p = one(folder)
    assert p.store == (StoreFlags(1, fs(), fs(SEEN)),) and p.remove_local == ()


# --------------------------------------------------------------------------
# The model: a server and a Maildir, random interleavings, convergence
# --------------------------------------------------------------------------

FOLDERS = ("A", "B", "C")
"""Three: a message can be moved by the reader to one folder and by another client to another."""
SERVER_FLAGS = (SEEN, FLAGGED, ANSWERED, DELETED, DRAFT, "$Junk")


@dataclass
class SMsg:
    cid: int
    flags: set[str]
    modseq: int


@dataclass
class SFolder:
    msgs: dict[int, SMsg] = field(default_factory=dict)
    uidnext: int = 1


@dataclass
class LMsg:
    cid: int
    letters: str
    subdir: str


@dataclass
class Row:
    key: str
    flags: Flags
    cid: int
    """The content the state recorded (a digest, in the wiring)."""

    size: int | None = None


class Model:
    """Server, Maildir and state, with the wiring's way of applying a plan."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.server = {f: SFolder() for f in FOLDERS}
        self.local: dict[str, dict[str, LMsg]] = {f: {} for f in FOLDERS}
        self.rows: dict[str, dict[int, Row]] = {f: {} for f in FOLDERS}
        self.modseq = 1
        self.cids = itertools.count(1)
        self.keys = itertools.count(1)
        self.created: set[int] = set()
        self.may_vanish: set[int] = set()
        self.conflicts = 0

    # -- server side ------------------------------------------------------

    def bump(self) -> int:
        self.modseq += 1
        return self.modseq

    def s_add(self, folder: str, cid: int, flags: set[str]) -> int:
        f = self.server[folder]
        uid = f.uidnext
        f.uidnext += 1
        f.msgs[uid] = SMsg(cid, set(flags), self.bump())
        return uid

    def s_store(self, folder: str, uid: int, add: Flags, remove: Flags, unchanged_since: int | None) -> bool:
        msg = self.server[folder].msgs.get(uid)
        if msg is None:
            return True  # a STORE on an expunged UID does nothing, and is not MODIFIED
        if unchanged_since is not None and msg.modseq > unchanged_since:
            return False
        new = (msg.flags | set(add)) - set(remove)
        if new != msg.flags:
            msg.flags = new
            msg.modseq = self.bump()
        return True

    def s_move(self, src: str, uid: int, dst: str) -> int | None:
        msg = self.server[src].msgs.pop(uid, None)
        if msg is None:
            return None
        return self.s_add(dst, msg.cid, msg.flags)

    # -- local side --------------------------------------------------------

    def new_key(self) -> str:
        return f"k{next(self.keys)}"

    def l_put(self, folder: str, key: str, cid: int, flags: Flags, subdir: str | None = None) -> None:
        letters = maildir_info(flags)
        self.local[folder][key] = LMsg(cid, letters, subdir or ("cur" if "S" in letters else "new"))

    # -- a round, as the wiring does it ---------------------------------------

    def inputs(self) -> tuple[dict[str, Folder], int]:
        folders = {}
        for name in FOLDERS:
            files = {
                key: LocalFile(m.subdir, f"{key}:2,{m.letters}", flags_from_info(m.letters))
                for key, m in self.local[name].items()
            }
            changed = frozenset(
                uid for uid, r in self.rows[name].items()
                if r.key in self.local[name] and self.local[name][r.key].cid != r.cid
            )
            folders[name] = Folder(
                rows={uid: MessageRecord(uid, r.key, r.flags, None) for uid, r in self.rows[name].items()},
                files=files,
                server={uid: frozenset(m.flags) for uid, m in self.server[name].msgs.items()},
                complete=True,
                changed_content=changed,
            )
        return folders, self.modseq

    def plan(self):
        folders, modseq = self.inputs()
        new, gone, unknown = identity_request(folders)
        new_identity = {(f, k): self.local[f][k].cid for f, k in new}
        gone_identity = {(f, u): self.rows[f][u].cid for f, u in gone}
        server_identity = {(f, u): self.server[f].msgs[u].cid for f, u in unknown}
        return plan_round(
            folders, policy=self.policy, max_delete=1.0, new_identity=new_identity, gone_identity=gone_identity,
            server_identity=server_identity,
        ), modseq

    def apply(self, plan, modseq: int) -> bool:
        """Apply a plan; True if it must be planned again before fetching (a move found its source gone)."""
        for name, p in plan.folders.items():
            assert p.refused is None, p.refused
            rows, local = self.rows[name], self.local[name]
            self.conflicts += len(p.conflicts)
            for uid in p.remove_local:
                r = rows.pop(uid)
                local.pop(r.key, None)
            for key in p.remove_files:
                local.pop(key, None)
            for uid in p.forget:
                rows.pop(uid)
            for ad in p.adopt:
                m = local[ad.key]
                m.letters = maildir_info(ad.flags)
                rows[ad.uid] = Row(ad.key, ad.base, m.cid)
            for rk in p.rekey:
                r = rows[rk.uid]
                rows[rk.uid] = Row(rk.new_key, r.flags, r.cid)
            refused_store: set[int] = set()
            for s in p.store:
                if not self.s_store(name, s.uid, s.add, s.remove, modseq):
                    refused_store.add(s.uid)  # MODIFIED: the next round merges again
            for change in p.local_flags:
                if change.uid in refused_store:
                    continue
                m = local.get(change.key)
                if m is not None:
                    m.letters = maildir_info(change.flags)
                    if "S" in m.letters:
                        m.subdir = "cur"
            for uid, flags in p.base.items():
                if uid in refused_store or uid not in rows:
                    continue
                r = rows[uid]
                rows[uid] = Row(r.key, flags, r.cid)
            for uid in p.delete:
                self.s_store(name, uid, fs(DELETED), fs(), None)
                if p.expunge:
                    self.server[name].msgs.pop(uid, None)
                    rows.pop(uid, None)
        again = False
        for mv in plan.moves:
            new_uid = self.s_move(mv.source, mv.uid, mv.target)
            outcome = settle_move(mv, {mv.uid: new_uid} if new_uid is not None else {})
            if outcome.source_gone:
                again = True  # nothing done: the source row stays, the file stays untracked
                continue
            assert outcome.new_uid is not None
            self.rows[mv.source].pop(mv.uid, None)  # none: a UID adopted from another folder
            if mv.lost is not None:
                self.rows[mv.lost[0]].pop(mv.lost[1])
            self.s_store(mv.target, outcome.new_uid, mv.add, mv.remove, None)
            m = self.local[mv.target][mv.key]
            m.letters = maildir_info(mv.local_flags)
            self.rows[mv.target][outcome.new_uid] = Row(mv.key, mv.base, m.cid)
        for name, p in plan.folders.items():
            for a in p.append:
                self._append(name, a)
        return again

    def _append(self, folder: str, a: Append) -> None:
        m = self.local[folder].get(a.key)
        if m is None:
            return  # the file went meanwhile: the next round sees it as a deletion of nothing
        uid = self.s_add(folder, m.cid, set(a.flags))
        self.rows[folder][uid] = Row(a.key, frozenset(a.flags), m.cid)

    def pull(self) -> None:
        """The one-way engine's part: drop what the server expunged (row and file),
        fetch new server mail, re-fetch what the plan kept."""
        for name in FOLDERS:
            rows, local = self.rows[name], self.local[name]
            for uid in [uid for uid in rows if uid not in self.server[name].msgs]:
                local.pop(rows.pop(uid).key, None)
            for uid, msg in self.server[name].msgs.items():
                r = rows.get(uid)
                if r is None:
                    key = self.new_key()
                    self.l_put(name, key, msg.cid, frozenset(msg.flags))
                    rows[uid] = Row(key, frozenset(msg.flags), msg.cid)
                elif r.key not in local and not (self.policy == "flag" and DELETED in r.flags and DELETED in msg.flags):
                    self.l_put(name, r.key, msg.cid, frozenset(msg.flags))
                    rows[uid] = Row(r.key, frozenset(msg.flags), msg.cid)

    def sync(self, race=None) -> None:
        plan, modseq = self.plan()
        if race is not None:
            race()
        for _ in range(3):
            if not self.apply(plan, modseq):
                break
            plan, modseq = self.plan()
        self.pull()

    # -- the claims ------------------------------------------------------------

    def check_converged(self) -> None:
        plan, _ = self.plan()
        for name, p in plan.folders.items():
            assert p.is_empty and not p.append, (name, p)
        assert plan.moves == ()
        for name in FOLDERS:
            server = {}
            for uid, m in self.server[name].msgs.items():
                r = self.rows[name].get(uid)
                assert r is not None, (name, uid)
                if r.key not in self.local[name]:
                    assert DELETED in m.flags and self.policy == "flag"  # a tombstone
                    continue
                server[m.cid] = maildir_info(frozenset(m.flags))
            local = {m.cid: m.letters for m in self.local[name].values()}
            assert len(local) == len(self.local[name]), "a message twice in one folder"
            assert server == local, name
        for side in ("server", "local"):
            cids = [
                m.cid
                for name in FOLDERS
                for m in (self.server[name].msgs.values() if side == "server" else self.local[name].values())
            ]
            assert len(cids) == len(set(cids)), f"a message duplicated on the {side}"
        present = {m.cid for name in FOLDERS for m in self.server[name].msgs.values()}
        lost = self.created - self.may_vanish - present
        assert not lost, f"lost {lost}"


class TwoWayMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["expunge", "flag", "keep"]), n=st.integers(0, 4))
    def start(self, policy: str, n: int) -> None:
        self.m = Model(policy)
        for i in range(n):
            cid = next(self.m.cids)
            self.m.created.add(cid)
            self.m.s_add(FOLDERS[i % len(FOLDERS)], cid, set())
        self.m.pull()

    def _pick_local(self, data: st.DataObject, folder: str) -> str | None:
        keys = sorted(self.m.local[folder])
        return data.draw(st.sampled_from(keys)) if keys else None

    def _pick_server(self, data: st.DataObject, folder: str) -> int | None:
        uids = sorted(self.m.server[folder].msgs)
        return data.draw(st.sampled_from(uids)) if uids else None

    # -- the reader ---------------------------------------------------------

    @rule(data=st.data(), folder=st.sampled_from(FOLDERS), letter=st.sampled_from(LETTERS))
    def local_toggle(self, data: st.DataObject, folder: str, letter: str) -> None:
        key = self._pick_local(data, folder)
        if key is not None:
            m = self.m.local[folder][key]
            m.letters = "".join(sorted(set(m.letters) ^ {letter}))
            m.subdir = "cur"

    @rule(data=st.data(), folder=st.sampled_from(FOLDERS))
    def local_delete(self, data: st.DataObject, folder: str) -> None:
        key = self._pick_local(data, folder)
        if key is not None:
            self.m.may_vanish.add(self.m.local[folder].pop(key).cid)

    @rule(folder=st.sampled_from(FOLDERS), letters=st.sets(st.sampled_from(LETTERS)))
    def local_save(self, folder: str, letters: set[str]) -> None:
        cid = next(self.m.cids)
        self.m.created.add(cid)
        self.m.l_put(folder, self.m.new_key(), cid, flags_from_info("".join(letters)))

    @rule(data=st.data(), folder=st.sampled_from(FOLDERS), same_key=st.booleans())
    def local_move(self, data: st.DataObject, folder: str, same_key: bool) -> None:
        key = self._pick_local(data, folder)
        other = data.draw(st.sampled_from([f for f in FOLDERS if f != folder]))
        if key is not None and not (same_key and key in self.m.local[other]):
            self.m.local[other][key if same_key else self.m.new_key()] = self.m.local[folder].pop(key)

    @rule(data=st.data(), folder=st.sampled_from(FOLDERS))
    def local_rename(self, data: st.DataObject, folder: str) -> None:
        key = self._pick_local(data, folder)
        if key is not None:
            self.m.local[folder][self.m.new_key()] = self.m.local[folder].pop(key)

    EDITS = False
    """Whether readers edit file contents (see TwoWayMachineWithEdits)."""

    @precondition(lambda self: self.EDITS)
    @rule(data=st.data(), folder=st.sampled_from(FOLDERS))
    def local_edit(self, data: st.DataObject, folder: str) -> None:
        key = self._pick_local(data, folder)
        if key is not None:
            m = self.m.local[folder][key]
            self.m.may_vanish.add(m.cid)  # the old content may go: it was replaced
            m.cid = next(self.m.cids)
            self.m.created.add(m.cid)

    @rule(data=st.data(), folder=st.sampled_from(FOLDERS))
    def local_mark_old(self, data: st.DataObject, folder: str) -> None:
        key = self._pick_local(data, folder)
        if key is not None:
            self.m.local[folder][key].subdir = "cur"

    # -- other clients on the server ----------------------------------------------

    def server_change(self, data: st.DataObject, kinds: tuple[str, ...] = ("flag", "expunge", "deliver", "move")) -> None:
        kind = data.draw(st.sampled_from(kinds))
        folder = data.draw(st.sampled_from(FOLDERS))
        if kind == "deliver":
            cid = next(self.m.cids)
            self.m.created.add(cid)
            self.m.s_add(folder, cid, set(data.draw(st.sets(st.sampled_from(SERVER_FLAGS)))))
            return
        uid = self._pick_server(data, folder)
        if uid is None:
            return
        if kind == "flag":
            flag = data.draw(st.sampled_from(SERVER_FLAGS))
            msg = self.m.server[folder].msgs[uid]
            msg.flags ^= {flag}
            msg.modseq = self.m.bump()
        elif kind == "expunge":
            self.m.may_vanish.add(self.m.server[folder].msgs.pop(uid).cid)
        else:
            self.m.s_move(folder, uid, data.draw(st.sampled_from([f for f in FOLDERS if f != folder])))

    @rule(data=st.data())
    def server(self, data: st.DataObject) -> None:
        self.server_change(data)

    # -- rounds ------------------------------------------------------------------

    @rule()
    def sync(self) -> None:
        self.m.sync()

    @rule(data=st.data(), n=st.integers(1, 3))
    def sync_with_a_race(self, data: st.DataObject, n: int) -> None:
        """Server changes land between the plan and its execution."""

        def race() -> None:
            for _ in range(n):
                self.server_change(data)

        self.m.sync(race)

    @invariant()
    def nothing_duplicated_on_the_server(self) -> None:
        if not hasattr(self, "m"):
            return
        cids = [m.cid for f in FOLDERS for m in self.m.server[f].msgs.values()]
        assert len(cids) == len(set(cids))

    def teardown(self) -> None:
        if not hasattr(self, "m"):
            return
        for _ in range(3):
            self.m.sync()
        self.m.check_converged()


def _model_settings(quick: bool) -> settings:
    """The slow runs search widely (run them with many --hypothesis-seed);
    the quick ones check the same claims on a fixed set of cases, every run."""
    health = [HealthCheck.too_slow, HealthCheck.filter_too_much]
    if quick:
        return settings(max_examples=150, stateful_step_count=25, deadline=None, derandomize=True,
                        database=None, suppress_health_check=health)
    return settings(max_examples=300, stateful_step_count=30, deadline=None, suppress_health_check=health)


class TwoWayMachineWithEdits(TwoWayMachine):
    EDITS = True


@pytest.mark.slow
def test_model_random_interleavings_converge() -> None:
    run_state_machine_as_test(TwoWayMachine, settings=_model_settings(quick=False))


@pytest.mark.slow
def test_model_with_content_edits_converges() -> None:
    run_state_machine_as_test(TwoWayMachineWithEdits, settings=_model_settings(quick=False))


def test_model_random_interleavings_converge_quick() -> None:
    run_state_machine_as_test(TwoWayMachine, settings=_model_settings(quick=True))


def test_model_with_content_edits_converges_quick() -> None:
    run_state_machine_as_test(TwoWayMachineWithEdits, settings=_model_settings(quick=True))


def test_server_move_racing_a_local_move_ends_in_one_place() -> None:
    """The plan's UID MOVE finds its source gone (another client moved it
    meanwhile). An APPEND of the reader's file (what settle_move did) left the
    message twice on the server. Now nothing is done, the round is planned
    again before fetching, and that round adopts the file as the UID the
    other client gave the message."""
    m = Model("expunge")
    m.created.add(1)
    m.s_add("B", 1, set())
    m.pull()
    key = next(iter(m.local["B"]))
    m.local["A"][key] = m.local["B"].pop(key)  # the reader moves it B -> A
    m.sync(race=lambda: m.s_move("B", 1, "A") and None)  # another client moves it to A meanwhile
    assert set(m.server["A"].msgs) == {1} and m.rows["A"] == {1: Row(key, fs(), 1)} and m.rows["B"] == {}
    m.check_converged()


def test_server_move_there_and_back_racing_a_local_move_ends_in_one_place() -> None:
    """As above, but the other client moved it on, back to where it was: the
    second round moves that new UID to where the reader put the file."""
    m = Model("expunge")
    m.created.add(1)
    m.s_add("B", 1, set())
    m.pull()
    key = next(iter(m.local["B"]))
    m.local["A"][key] = m.local["B"].pop(key)

    def there_and_back() -> None:
        m.s_move("B", 1, "A")
        m.s_move("A", 1, "B")

    m.sync(race=there_and_back)
    assert m.server["B"].msgs == {} and set(m.server["A"].msgs) == {2} and m.rows["A"] == {2: Row(key, fs(), 1)}
    m.check_converged()


def test_a_move_whose_source_was_expunged_meanwhile_is_appended_by_the_next_round() -> None:
    m = Model("expunge")
    m.created.add(1)
    m.s_add("B", 1, {SEEN})
    m.pull()
    key = next(iter(m.local["B"]))
    m.local["A"][key] = m.local["B"].pop(key)
    m.sync(race=lambda: m.server["B"].msgs.pop(1) and None)
    assert m.server["B"].msgs == {} and [s.cid for s in m.server["A"].msgs.values()] == [1]
    assert m.rows["B"] == {} and [r.key for r in m.rows["A"].values()] == [key]
    m.check_converged()


def test_a_renamed_file_with_deleted_flag_is_a_rename_not_a_new_message() -> None:
    """Found by the model: a T-flagged file looked like a tombstone once renamed, and was uploaded again."""
    folder = Folder({1: row(1, "old", DELETED)}, {"new": lf("new", "T")}, {1: fs(DELETED)}, complete=True)
    p = plan_round({"A": folder}, policy="flag", new_identity={("A", "new"): "x"}, gone_identity={("A", 1): "x"}).folders["A"]
    assert p.rekey == (Rekey(1, "old", "new"),) and p.append == () and p.tombstones == ()


def test_moved_locally_while_moved_elsewhere_on_the_server_is_moved_not_appended() -> None:
    """Found by the model (seed 11): the reader moved A's file to B while another
    client moved the message on the server (A -> B -> A: a new UID in A). The
    file was appended to B and the new UID fetched into A: twice on the server."""
    folders = {
        "A": Folder({2: row(2, "k2")}, {}, {3: fs(SEEN, "$Junk")}, complete=True),
        "B": Folder({}, {"k6": lf("k6", "F")}, {}, complete=True),
    }
    new, gone, unknown = identity_request(folders)
    assert new == {("B", "k6")} and gone == {("A", 2)} and unknown == {("A", 3)}
    plan = plan_round(
        folders, new_identity={("B", "k6"): "x"}, gone_identity={("A", 2): "x"}, server_identity={("A", 3): "x"}
    )
    assert plan.moves == (Move("A", 3, "B", "k6", fs(SEEN), fs(), fs(), fs(SEEN, "$Junk"), lost=("A", 2)),)
    assert plan.folders["A"].remove_local == ()  # dropped with the move (Move.lost)
    assert plan.folders["B"].append == ()
    # Without a row that lost the content, an unknown UID elsewhere may be another copy: appended.
    plan = plan_round(
        {"A": Folder({}, {}, {3: fs()}, complete=True), "B": folders["B"]},
        new_identity={("B", "k6"): "x"}, server_identity={("A", 3): "x"},
    )
    assert plan.moves == () and plan.folders["B"].append == (Append("k6", fs(FLAGGED)),)


@pytest.mark.parametrize("policy", ["expunge", "flag", "keep"])
def test_a_file_moved_in_under_a_rows_key_is_a_move_not_new_content(policy: str) -> None:
    """Found by the model (seed 6): a file moved back into a folder keeps its
    Maildir name, which a row there still had (a tombstone, or the row of a
    copy the reader deleted); taken for that row's new content, it was
    APPENDed while its own row elsewhere was deleted or fetched back."""
    a_flags = fs(DELETED) if policy == "flag" else fs()
    folders = {
        "A": Folder({1: row(1, "k1", *a_flags)}, {"k1": lf("k1", "S")}, {1: a_flags}, complete=True,
                    changed_content=frozenset({1})),
        "B": Folder({4: row(4, "k1")}, {}, {4: fs()}, complete=True),
    }
    new, gone, _ = identity_request(folders)
    assert new == {("A", "k1")} and gone == {("A", 1), ("B", 4)}
    plan = plan_round(folders, policy=policy, new_identity={("A", "k1"): "y"},
                      gone_identity={("A", 1): "x", ("B", 4): "y"})
    assert plan.moves == (Move("B", 4, "A", "k1", fs(SEEN), fs(SEEN), fs(), fs(SEEN)),)
    a = plan.folders["A"]
    assert a.forget == (1,) and a.append == () and a.remove_local == ()
    assert a.delete == (() if policy == "keep" else (1,))
    assert plan.folders["B"].is_empty


def test_a_renamed_file_and_another_moved_in_under_its_old_name_are_a_rename_and_a_move() -> None:
    """Found by the model (seed 6): the reader renamed A's file k1 to k3, then
    moved B's file k1 into A. Taken for new content in k1, both were uploaded."""
    folders = {
        "A": Folder({1: row(1, "k1")}, {"k1": lf("k1"), "k3": lf("k3", "F")}, {1: fs()}, complete=True,
                    changed_content=frozenset({1})),
        "B": Folder({4: row(4, "k1")}, {}, {4: fs()}, complete=True),
    }
    plan = plan_round(folders, policy="keep", new_identity={("A", "k1"): "y", ("A", "k3"): "x"},
                      gone_identity={("A", 1): "x", ("B", 4): "y"})
    a = plan.folders["A"]
    assert a.rekey == (Rekey(1, "k1", "k3"),) and a.store == (StoreFlags(1, fs(FLAGGED), fs()),)
    assert a.append == () and a.forget == () and a.refetch == ()
    assert plan.moves == (Move("B", 4, "A", "k1", fs(), fs(), fs(), fs()),)


def test_new_content_under_a_key_whose_old_content_moved_to_a_refused_folder_is_held() -> None:
    """The row stays (its move waits for the refused folder), so its key's new
    content must wait too: appended now, two rows would name one file."""
    big = _many(20, 0)
    folders = {
        "A": Folder({1: row(1, "k")}, {"k": lf("k")}, {1: fs()}, complete=True, changed_content=frozenset({1})),
        "B": Folder(big.rows, big.files | {"m": lf("m")}, big.server, complete=True),
    }
    plan = plan_round(folders, new_identity={("A", "k"): "y", ("B", "m"): "x"}, gone_identity={("A", 1): "x"})
    assert plan.folders["B"].refused and plan.moves == ()
    a = plan.folders["A"]
    assert a.held == ("k",) and a.append == () and a.forget == () and a.delete == ()


def test_a_cross_folder_adoption_whose_source_moved_on_keeps_its_evidence_for_the_next_round() -> None:
    """Found by the model (seed 90): the MOVE of an adopted UID found it gone
    (moved on again); the row that lost the content had been dropped, so the
    next round no longer knew the reader's file was that message: appended,
    and the UID fetched where it had gone. The row now stays until the move is done."""
    m = Model("expunge")
    m.created.add(1)
    m.s_add("B", 1, set())
    m.pull()
    key = next(iter(m.local["B"]))
    m.local["A"][key] = m.local["B"].pop(key)  # the reader moves it B -> A
    m.s_move("B", 1, "C")  # another client moves it B -> C

    def on_again() -> None:
        m.s_move("C", 1, "B")  # and on, C -> B, while our MOVE C -> A is on its way

    m.sync(race=on_again)
    assert m.server["B"].msgs == {} and m.server["C"].msgs == {} and next(iter(m.rows["A"].values())).key == key
    m.check_converged()
