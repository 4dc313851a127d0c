from vlmptq.cli import main

raise SystemExit(main())
