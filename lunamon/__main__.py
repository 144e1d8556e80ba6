"""``python -m lunamon``: the ``lunamon`` command."""

from lunamon.cli import main

raise SystemExit(main())
