"""Retrieval: the scoring engine shared by validation, evaluation and search, the metrics, the
first-stage index, the time span of a hit, and the search reports."""
