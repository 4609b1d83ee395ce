"""Editing methods (KnowledgeEditor and baselines), deltas, training and evaluation."""
