"""``make compare``: the measured MLflow-vs-W&B evaluation.

The same experiment with no tracker, MLflow, W&B and both, in fresh processes (``runs.py``); per-call
latency through our tracker layer and through the raw clients (``latency.py``); cost as work grows
(``scaling.py``); fidelity, footprint, observed capabilities and integration effort; one report in
Markdown, JSON, PNG and self-contained HTML (``report.py``). ``compare.py`` runs it all.

This package sits above ``training/`` and ``tracking/`` and only imports downward.
"""
