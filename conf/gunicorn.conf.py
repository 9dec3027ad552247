"""gunicorn settings for ``gunicorn -c conf/gunicorn.conf.py wsgi:balancer`` (the Procfile's): paddler_sync's own.

The same as ``-c python:paddler_sync.gunicorn_conf`` and as the project's top-level gunicorn.conf.py
(which gunicorn reads by itself when started here): see paddler_sync/gunicorn_conf.py.
"""

from paddler_sync.gunicorn_conf import *  # noqa: F403
