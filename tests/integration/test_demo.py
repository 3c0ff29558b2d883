"""`mirrord demo`, the README's first command, end to end."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.integration._mirrord import local_messages, mirrord


def test_demo_mirrors_then_shows_live_mail_and_stops_cleanly() -> None:
    # Not under pytest's 0700 tmp dir: Dovecot's mail processes run as nobody under root.
    with tempfile.TemporaryDirectory(prefix="mirrord-demo-test-") as tmp:
        root = Path(tmp)
        run = mirrord("demo", "--dir", str(root), "--live", "2", timeout=180)
        assert run.status == 0, run.stdout + run.stderr
        assert "Filled it with 38 messages" in run.stdout
        assert "Live message 2: on disk" in run.stdout
        assert "exited with status 0" in run.stdout
        assert len(local_messages(root / "Mail" / "INBOX")) == 22
        assert len(local_messages(root / "Mail" / "Entwürfe")) == 4
        assert "Traceback" not in run.stderr
