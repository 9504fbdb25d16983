from patchmine.cli import main

raise SystemExit(main())
