"""The config is parsed with libyaml where PyYAML has it, with the pure-Python parser's messages.

libyaml parses the config in a tenth of the time (0.6 ms of every start,
issue #15); a file it refuses is parsed again by the pure-Python parser so
that what the user reads does not depend on how PyYAML was built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrord.config import ConfigError, load_config

pytestmark = pytest.mark.skipif(not getattr(yaml, "__with_libyaml__", False), reason="PyYAML without libyaml")

GOOD = """\
state_dir: {root}/state
accounts:
  home: &common
    tls: none
    workers: 2
    host: 127.0.0.1
    username: me
    password_command: [echo, secret]
    maildir: {root}/Mail
    mailboxes: ["INBOX", "Lists/*"]
  work:
    <<: *common
    username: "w\\u00e9rk"
    maildir: '{root}/Work'
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text.format(root=tmp_path))
    path.chmod(0o600)
    return path


def loaders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    used: list[str] = []
    real = yaml.compose

    def compose(text: str, Loader: Any) -> Any:
        used.append(Loader.__name__)
        return real(text, Loader=Loader)

    monkeypatch.setattr(yaml, "compose", compose)
    return used


def test_a_good_file_is_parsed_once_by_libyaml_to_the_same_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD)
    used = loaders(monkeypatch)
    fast = load_config(path)
    assert used == ["CSafeLoader"]
    monkeypatch.setattr(yaml, "CSafeLoader", None)
    assert load_config(path) == fast
    assert used == ["CSafeLoader", "SafeLoader"]


@pytest.mark.parametrize("text", ["accounts:\n  home: [\n", "a: b: c\n", "accounts:\n\t- x\n", "--- 1\n--- 2\n"])
def test_a_bad_file_gets_the_pure_python_parsers_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as fast:
        load_config(path)
    monkeypatch.setattr(yaml, "CSafeLoader", None)
    with pytest.raises(ConfigError) as pure:
        load_config(path)
    assert str(fast.value) == str(pure.value)
