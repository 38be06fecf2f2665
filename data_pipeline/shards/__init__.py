"""Stage 2, shards: the on-disk shard format, its folders (local or s3://), integrity and `verify`."""
