from mirrord.cli import entry

entry()
