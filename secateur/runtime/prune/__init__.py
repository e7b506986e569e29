"""The pruning pass: what a stage receives, scores, selection, restoration, surgery, the sequential pass."""
