"""The reverse proxy: the WSGI app that relays each request to a llama.cpp server (app), and the
connections and header rules towards llama.cpp (upstream)."""
