"""`python -m app`: the same as `flowspec-studio`."""

from app.main import main

raise SystemExit(main())
