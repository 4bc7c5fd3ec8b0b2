from fleetkit.cli.main import main

raise SystemExit(main())
