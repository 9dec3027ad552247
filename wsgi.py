"""``gunicorn -k gevent wsgi:balancer``: the balancer, built in the worker from conf/ and PADDLER_*."""

from paddler_sync.server import create_balancer

balancer = create_balancer()
