"""Data: webdataset shards, presets generated on first use, deterministic resumable streams."""
