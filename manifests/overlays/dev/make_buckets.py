# Create every bucket in $BUCKETS on the S3 endpoint of $MULAMBDA_S3_*; wait for it first.
import os
import sys
import time

from mulambda.storage.s3 import ModelStorage

storage = ModelStorage.from_env()
for bucket in filter(None, os.environ["BUCKETS"].split(",")):
    for _ in range(90):
        try:
            storage.make_bucket(bucket)
        except Exception as exc:  # MinIO not up yet: connection refused, 503
            print(f"waiting for S3 bucket={bucket} error={exc}", flush=True)
            time.sleep(2)
        else:
            print(f"bucket ready bucket={bucket}", flush=True)
            break
    else:
        sys.exit(f"could not create bucket {bucket}")
