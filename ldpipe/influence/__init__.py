"""Cross-example influence: eNTK updates and kernels (entk: exact, projected, naive, A-K-G), and the analyses over a
run's checkpoints (runs)."""
