"""Pipeline steps, one job each.  Their order is written once, in :mod:`ingest.pipeline`."""
