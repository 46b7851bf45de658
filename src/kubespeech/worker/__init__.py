"""The worker runtime: load an engine once, pull micro-batches from Redis, publish one result per job."""
