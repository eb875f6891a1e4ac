"""The data stage: sources (CIFAR-10 archive, image folders) -> Ray Data -> Parquet shards + manifest."""


from pipeline import InputError


class SourceError(InputError):
    """The configured source is missing, malformed or unsafe; the message says what to change."""
