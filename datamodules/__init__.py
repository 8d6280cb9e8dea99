"""Method-agnostic DataModules: the synthetic world, COCO, WebDataset shards, benchmarks."""
