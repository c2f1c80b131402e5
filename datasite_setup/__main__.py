from datasite_setup.cli import main

raise SystemExit(main())
