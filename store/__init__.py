"""patchaudit store: bytes at rest (object storage, model artifacts, Parquet reports).

Depends on nothing else of ours.
"""
