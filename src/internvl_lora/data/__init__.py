"""Data step: the official InternVL JSONL + meta format, its audit, and the training dataset."""
