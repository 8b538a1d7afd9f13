"""Ingest: label sources (UTKFace names, label files, class folders) -> checked, hashed records and splits."""
