"""What the routing policies know about servers beyond their free slots, learned from the traffic itself.

    prefixes     a prompt as chained block hashes, to compare what servers have cached
    affinity     where each prompt's prefix was sent lately (llama.cpp keeps it in that slot's cache)
    speed        how fast each server prefills and generates, from llama.cpp's own timings
    first_token  the expected seconds to a request's first token on each server, from the three above

The policy that uses them is paddler_sync/ledger/policy.py (the ledger only sees a score per server).
"""
