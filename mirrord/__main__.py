from mirrord.cli import main

raise SystemExit(main())
