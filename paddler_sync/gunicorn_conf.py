"""paddler_sync's gunicorn settings as a gunicorn config module: ``gunicorn -c python:paddler_sync.gunicorn_conf``.

The values come from the balancer's own settings (conf/balancer.conf below the working directory and
PADDLER_* variables), so the proxy binds --reverseproxy-addr and there is one place to configure; the
hooks check the worker and name a taken address. Options given on gunicorn's command line (-b, -w ...)
still override these. Never add preload_app: the app must be imported after gevent patches the worker.
"""

from paddler_sync.server import gunicorn_settings
from paddler_sync.settings import parse_settings

globals().update(gunicorn_settings(parse_settings("balancer", args=[])))
