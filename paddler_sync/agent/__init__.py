"""The agent: one per llama.cpp server, it watches the server and reports to the balancer."""
