"""The management server: agent reports, the fleet API, health, metrics and the web dashboard."""
