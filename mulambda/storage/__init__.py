"""Model storage: where models live in S3 (layout), the S3 client, checksums of model bytes."""
