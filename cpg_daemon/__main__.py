from cpg_daemon.cli import main

raise SystemExit(main())
