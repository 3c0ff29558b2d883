"""CRLF -> LF: the C accelerator and the pure-Python fallback agree with the definition.

The C module is compiled here from the source in the tree (so the test
follows the file, not whatever build is lying around), with the compiler
and headers Python was built with. CI installs both; a developer machine
without them skips these tests.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
import shlex
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrord.store import maildir as maildir_mod
from mirrord.store import newlines
from mirrord.store.maildir import Maildir
from tests._needs import missing

SOURCE = Path(newlines.__file__).with_name("_newlines.c")
Convert = Callable[[bytes | memoryview], bytes]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("mirrord.store._newlines", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        missing(f"Python's C headers are not in {include}; run `apt-get install python3-dev`")
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    out = tmp_path_factory.mktemp("cext") / ("_newlines" + sysconfig.get_config_var("EXT_SUFFIX"))
    command = [*cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", f"-I{include}", str(SOURCE), "-o", str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        missing(f"no C compiler ({cc[0]}); run `apt-get install gcc libc6-dev`")
    assert done.returncode == 0, f"{shlex.join(command)} failed:\n{done.stderr}"
    return _load(out)


@pytest.fixture(params=["c", "python"])
def convert(request: pytest.FixtureRequest) -> Convert:
    if request.param == "python":
        return newlines._crlf_to_lf_python
    return request.getfixturevalue("compiled").crlf_to_lf  # type: ignore[no-any-return]


# Bytes rich in CR and LF, next to each other in every order.
crlf_rich = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\r", b"x", b"\x00", b"\r\r\n", b"\xff"]), max_size=120).map(
        b"".join
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=crlf_rich, start=st.integers(min_value=0, max_value=5))
def test_every_crlf_becomes_lf_and_nothing_else_changes(convert: Convert, data: bytes, start: int) -> None:
    expected = data.replace(b"\r\n", b"\n")
    assert convert(data) == expected
    # A piece of a larger read, as the protocol reader hands bodies over.
    framed = b"\r\n" * start + data + b"\r"
    view = memoryview(framed)[2 * start : 2 * start + len(data)]
    result = convert(view)
    assert type(result) is bytes
    assert result == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", b""),
        (b"\r", b"\r"),  # a CR at the end stays: the caller holds it for the next piece
        (b"a\r", b"a\r"),
        (b"\r\n", b"\n"),
        (b"\r\r\n", b"\r\n"),
        (b"\n\r", b"\n\r"),
        (b"a\rb", b"a\rb"),
        (b"no line ends", b"no line ends"),
    ],
)
def test_edges(convert: Convert, data: bytes, expected: bytes) -> None:
    assert convert(data) == expected
    assert convert(bytearray(data)) == expected


def test_pieces_large_enough_to_run_beside_other_threads(convert: Convert) -> None:
    # Past the size from which the C loop lets go of the GIL (64 KB): mail-like
    # lines with now and then a lone CR, in 3 MB.
    rng = random.Random(15)
    lines = [bytes(rng.choices(b"abc def\r", k=rng.randrange(0, 120))) + b"\r\n" for _ in range(40_000)]
    data = b"".join(lines)
    assert len(data) > 2_000_000
    assert convert(memoryview(data)[1:]) == data[1:].replace(b"\r\n", b"\n")


def test_what_is_not_one_run_of_bytes_is_refused(compiled: ModuleType) -> None:
    with pytest.raises(TypeError):
        compiled.crlf_to_lf("a\r\n")
    with pytest.raises(BufferError):
        compiled.crlf_to_lf(memoryview(b"a\r\nb\r\n")[::2])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=crlf_rich, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=20), views=st.booleans())
def test_a_message_written_in_any_pieces_is_the_exact_conversion(
    convert: Convert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, cuts: list[int], views: bool
) -> None:
    # The file writer holds a CR at the end of a piece back for the next one,
    # so that no CRLF is split between two calls of the conversion.
    # ``views``: pieces of one buffer, as the protocol reader hands out the parts of a read.
    monkeypatch.setattr(maildir_mod, "crlf_to_lf", convert)
    md = Maildir(tmp_path / "INBOX")
    points = sorted({min(c, len(data)) for c in cuts})
    whole = memoryview(data) if views else data
    tmp = md.open_tmp()
    for a, b in zip([0, *points], [*points, len(data)]):
        tmp.write(whole[a:b])
    key = md.deliver(tmp, frozenset())
    expected = data.replace(b"\r\n", b"\n")
    assert (md.path / "new" / key).read_bytes() == expected
    assert tmp.size == len(expected)
    md.remove(key)


def test_the_installed_package_carries_the_built_loop() -> None:
    # pip builds the extension when a compiler is there (CI installs one): a
    # packaging mistake that silently left it out would only show as CPU.
    # Looked up in site-packages only: run from the repository, the metadata
    # that pip's build left there (mirrord.egg-info) would be found first.
    site = [sysconfig.get_paths()["platlib"], sysconfig.get_paths()["purelib"]]
    installed = list(importlib.metadata.distributions(name="mirrord", path=site))
    if not installed:
        missing("mirrord is not installed (pip install .)")
    files = installed[0].files or []
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = [f for f in files if str(f) == f"mirrord/store/_newlines{suffix}"]
    if not built:
        missing("the installed mirrord has no built mirrord/store/_newlines (an editable install, or no compiler)")
    module = _load(Path(built[0].locate()))
    assert module.crlf_to_lf(b"a\r\nb\rc\n") == b"a\nb\rc\n"
