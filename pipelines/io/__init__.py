"""Beam sources of a job's inputs: image datasets and precomputed embeddings.

`readers` (ImageFolder, TFRecord, CSV/JSONL manifests, WebDataset; local or gs://), `embedding_sources`
(``clip:`` and ``tfrecord:`` embeddings).
"""
