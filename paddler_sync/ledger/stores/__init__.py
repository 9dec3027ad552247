"""Where the ledger's slot counts are kept: base (the interface and its answers), local (this process),
redis/ (shared by many workers and balancers)."""
