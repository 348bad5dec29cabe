from orpo_ds.cli import main

raise SystemExit(main())
