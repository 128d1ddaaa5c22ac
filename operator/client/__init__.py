"""Client: kopf handlers, reconcile, status and the workload builders."""
