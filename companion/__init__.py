"""The companion sidecar (import name ``mulambda.companion``)."""
