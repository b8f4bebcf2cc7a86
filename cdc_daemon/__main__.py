from cdc_daemon.cli import main

raise SystemExit(main())
