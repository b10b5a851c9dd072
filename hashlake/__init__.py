"""hashlake: deep-hashing image retrieval over object storage, queried with SQL."""

__version__ = "0.1.0"
