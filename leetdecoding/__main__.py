"""`python -m leetdecoding info | check | bench`."""

from .cli import main

raise SystemExit(main())
