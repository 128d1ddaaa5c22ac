"""Model storage: S3-compatible object stores and the checksums that verify model bytes."""
