"""The metadata store (Redis, Valkey, DragonflyDB): records, keys, in-flight leases."""
