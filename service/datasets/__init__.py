"""Preference datasets: one row normalized (`rows`), a whole upload validated in one streaming
pass (`validate`), and stored content-addressed with its record (`ingest`)."""
