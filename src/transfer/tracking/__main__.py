"""`python -m transfer.tracking url [EXPERIMENT]`: the runs view of the configured store's experiment."""

from transfer.tracking.store import main

raise SystemExit(main())
