"""gunicorn settings for ``gunicorn -c conf/gunicorn.conf.py wsgi:balancer``.

The values come from the balancer's own settings (conf/balancer.conf and PADDLER_* variables),
so the proxy binds --reverseproxy-addr and there is one place to configure. Options given on
gunicorn's command line (-b, -w ...) still override these. Never add preload_app: the app must be
imported after gevent patches the worker.
"""

from paddler_sync.server import gunicorn_settings
from paddler_sync.settings import parse_settings

globals().update(gunicorn_settings(parse_settings("balancer", args=[])))
