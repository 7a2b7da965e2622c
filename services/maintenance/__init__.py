"""Maintenance: background jobs (started over req/rep) and periodic pruning."""
