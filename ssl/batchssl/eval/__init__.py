"""Frozen-backbone evaluation: features, FAISS weighted kNN, linear probes (cached and augmented), and loading a
backbone from a run directory or from weights. The training monitor and the `knn_eval` / `linear_probe` command
lines call these same functions."""
