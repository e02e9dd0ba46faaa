"""Judging the model: manifests, crops, metrics (agreeing with score.py) and evaluate."""
