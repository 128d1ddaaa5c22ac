"""mulambda: serverless ML model executors on Kubernetes, selected by traits."""

__version__ = "0.1.0"
