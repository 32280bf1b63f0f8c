"""Signed outbound webhooks (Standard Webhooks): per-user endpoints, a consumer of
``palette.events`` that records one delivery per (endpoint, event) in PostgreSQL, and a sender
that posts due deliveries with retries, in order per job and endpoint.

Endpoints and deliveries live in tables of their own (schema ``palette_webhooks``), not in the
event store: they are delivery plumbing, not business facts. Nothing is derived from them (no
read model, no ledger), a delivery's state changes on every attempt (a log of attempts as events
would outgrow the facts it reports), and an endpoint holds a signing secret the event log must not
carry (the log is replayed, exported and shipped to Kafka). The events a webhook reports are the
job's own, already in the log.
"""
