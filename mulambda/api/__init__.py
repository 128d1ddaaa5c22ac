"""The CRD contract: typed specs of ModelExecutor and Client, parsed once at the boundary."""
