"""Prometheus metrics and the health endpoints, served by the supervisor (or the
one process): what a monitoring system needs to graph and alert on the relay."""
