"""Quantities measured on model outputs: token entropy, critical-token entropy, train-vs-rollout mismatch."""
