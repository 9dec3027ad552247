"""Read by gunicorn by itself when started in this folder: a bare ``gunicorn -k gevent wsgi:balancer`` gets
paddler_sync's settings and hooks (see paddler_sync/gunicorn_conf.py)."""

from paddler_sync.gunicorn_conf import *  # noqa: F403
