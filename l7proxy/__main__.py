from l7proxy.cli import main

raise SystemExit(main())
