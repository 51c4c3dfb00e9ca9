"""Probe responses: the data model, builders from datasets, tokenization, sampling and scoring."""
