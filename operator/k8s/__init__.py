"""Kubernetes plumbing shared by both kinds: API calls, owned children, conditions."""
