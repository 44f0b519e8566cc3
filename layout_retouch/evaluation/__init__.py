"""Batch evaluation: concept datasets, prompt sets, the resumable sharded runner and its reports."""
