from mulambda.cli import main

raise SystemExit(main())
