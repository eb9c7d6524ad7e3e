"""Observability: structured logging, Prometheus exposition, metric definitions (design §7)."""
