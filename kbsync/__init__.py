"""kbsync: keep a served language model's facts in step with a knowledge base."""

__version__ = "0.1.0"
