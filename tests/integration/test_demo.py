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

        # Its last words work after it has stopped its server (issue 16 item 4).
        advice = run.stdout.split("Stopped the private Dovecot.", 1)[1]
        assert f"  mirrord -c {root / 'config.yaml'} status\n" in advice, advice
        assert f"-c {root / 'config.yaml'} run" not in advice, "no command that needs the stopped server"
        status = mirrord("-c", str(root / "config.yaml"), "status")
        assert status.status == 0 and "INBOX" in status.stdout, status.stdout + status.stderr
        home = root / "home"
        home.mkdir()
        env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
        init = mirrord("init", env=env)
        assert init.status == 0 and (home / ".config" / "mirrord" / "config.yaml").exists()
