"""Fleet state: the slot ledger, the routing policy, the request buffer and the agent registry."""
