"""The floor of our own stack: a naive least-connections proxy in ~50 lines, as a user would first write it.

A bare WSGI function over a gevent-patched requests.Session (stream=True, iter_content(None)), run
with ``gunicorn -k gevent -w 1 bench.naive_proxy:app`` and ``UPSTREAMS=host:port,host:port``.
No slots, no buffer, no metrics: what paddler_sync must beat while doing all of that.
"""

import os

import requests
from requests.adapters import HTTPAdapter

UPSTREAMS = os.environ.get("UPSTREAMS", "127.0.0.1:8081").split(",")
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "content-length", "host"}
in_flight = dict.fromkeys(UPSTREAMS, 0)
session = requests.Session()
session.mount("http://", HTTPAdapter(pool_connections=len(UPSTREAMS), pool_maxsize=1000))


def app(environ, start_response):
    upstream = min(UPSTREAMS, key=in_flight.__getitem__)
    in_flight[upstream] += 1
    headers = {k[5:].replace("_", "-"): v for k, v in environ.items()
               if k.startswith("HTTP_") and k[5:].replace("_", "-").lower() not in HOP}
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    body = environ["wsgi.input"].read()
    url = f"http://{upstream}{environ.get('PATH_INFO', '/')}"
    try:
        response = session.request(environ["REQUEST_METHOD"], url, data=body, headers=headers, stream=True)
    except requests.RequestException:
        in_flight[upstream] -= 1
        start_response("502 Bad Gateway", [("Content-Type", "text/plain")])
        return [b"bad gateway"]
    out = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP]
    start_response(f"{response.status_code} {response.reason}", out)

    def body_chunks():
        try:
            yield from response.iter_content(chunk_size=None)
        finally:
            response.close()
            in_flight[upstream] -= 1

    return body_chunks()
