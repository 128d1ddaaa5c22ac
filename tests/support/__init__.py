"""Test support: real servers (redis-server, SeaweedFS), the KMock cluster, test doubles."""
