"""Training: the loop (trainer), metrics, plots, final evaluation and the end-to-end run."""
