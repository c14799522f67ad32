from extguard.cli import main

raise SystemExit(main())
