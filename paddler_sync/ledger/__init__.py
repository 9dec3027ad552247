"""The slot ledger: where a slot is taken and where it is given back. A pure core over a pluggable store.

    slots     a server's slot counts (Upstream), a taken slot (Reservation), a place in the queue (Ticket)
    policy    which server with a free slot gets the next request (first-token, most-free, round robin, ...)
    ledger    Ledger.reserve takes a slot, Ledger.give_back gives it back (saying why: slots.GiveBack); agents'
              reports reconcile the counts
    buffer    requests that found no free slot wait here, in order, never inside llama.cpp
    refusals  why a request gets no slot, with the status its client gets
    stores/   where the counts are kept: base (the interface), local (this process), redis/ (many workers
              and balancers: scripts in redis/lua/, the connection in redis/connect, tenants' rates in
              redis/rates)

Nothing here imports the routing estimators (paddler_sync.routing), the fleet's state (paddler_sync.fleet), the
proxy or a server; tests/unit/test_architecture.py holds every layer to that.
"""
