"""The data stage: sources (CIFAR-10 archive, image folders) -> Ray Data -> Parquet shards + manifest."""
