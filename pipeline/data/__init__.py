"""The data stage: the shard schema, storage (local or s3://), the four corpus readers, ingest into
Parquet shards with manifests, the data-recipe split, the class-balanced sampler and the reader of
accepted pseudo labels. Ray enters only in `ray_ingest`."""
