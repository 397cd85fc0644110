"""Runtime plumbing, private: page-cache advice, prefetching in worker threads, torch's
threads, the C heap, shard reads, progress bars and units. Nothing here is public API."""
