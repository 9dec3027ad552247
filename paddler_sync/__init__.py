"""paddler_sync: a slot-aware load balancer for llama.cpp fleets.

This module stays import-light on purpose: nothing here may import ssl, requests or threading
primitives, because the command line imports it before gevent patches the standard library.
"""

__version__ = "0.1.0"
