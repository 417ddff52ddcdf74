"""The inference stage: per-frame prediction, one output file per input shard (resumable), per-video
smoothed outputs, the ABAW submission file and the pseudo-label export. Ray enters only in
`ray_inference` (the Ray Data actor pool)."""
