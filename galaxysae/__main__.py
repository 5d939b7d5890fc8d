from galaxysae.cli import main

raise SystemExit(main())
