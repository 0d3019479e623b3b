"""The learner: recompute log-probs, apply GSPO with staleness-aware clipping, publish checkpoints."""
