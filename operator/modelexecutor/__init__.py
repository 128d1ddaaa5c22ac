"""ModelExecutor: kopf handlers, reconcile, status, builders and the autoscaler."""
