from udean.cli import main

raise SystemExit(main())
