"""Hyperparameter tuning for both trackers, with one engine: Optuna.

- :mod:`~cxrtrack.tuning.space`: the search space (this project's YAML format) and the checks every
  parameter passes before a trial runs;
- :mod:`~cxrtrack.tuning.sweep_format`: W&B's sweep format, translated to the same space (pure parsing), and
  ``load_spec``, which reads a file in either format;
- :mod:`~cxrtrack.tuning.wandb_sweep`: the online path (a real W&B sweep and agent) when an API key and the
  server are there; the only tuning module that imports ``wandb``;
- :mod:`~cxrtrack.tuning.optuna_search`: storage, samplers, pruners, the trial objective and workers;
- :mod:`~cxrtrack.tuning.study`: one tuning session end to end (parent run, workers, report);
- :mod:`~cxrtrack.tuning.report`: the trials table, the best config file, Optuna's plots, overhead.

``tuning`` sits above ``training``, ``tracking`` and ``data`` and imports them; nothing imports it.
"""
