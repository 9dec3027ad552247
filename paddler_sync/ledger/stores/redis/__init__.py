"""The slot store in Redis (one server, a master behind Sentinels, or a Redis Cluster).

    store    RedisStore: key names, the scripts' calls, this worker's leases and tickets
    connect  the client for each kind of URL, password-free URLs for logs, the cluster's hash tag
    rates    tenants' requests and tokens per minute, counted across every balancer
    lua/     the atomic operations (take, release, report, remove, renew, snapshot, ...), each documented
             in its header
"""
