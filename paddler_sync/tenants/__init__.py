"""Tenants: who sends a request, and how the fleet's slots are shared among them (``--tenants``).

    book   the tenants file: parsed and checked (errors name the line), keys looked up in constant time
    rule   the scheduling rule, pure: whose request goes next (priority, then fewest slots per unit of weight,
           then first come) and whether a tenant may take a slot now (its cap, the others' reservations)
    rates  requests and tokens per minute, per tenant, over a sliding minute

The ledger (paddler_sync/ledger/ledger.py) and its stores apply ``rule`` atomically with each take; the buffer
(paddler_sync/ledger/buffer.py) orders its waiters by it; the proxy (paddler_sync/proxy/tenancy.py) identifies the
tenant, refuses what the file forbids and keeps the client's key away from llama.cpp.
"""
