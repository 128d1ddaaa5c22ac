"""Command-line tools that need neither kopf nor the Kubernetes client."""
