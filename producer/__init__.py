"""Producers: sample groups of completions with behaviour log-probs and rewards, append them to Redis."""
