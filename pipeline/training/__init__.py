"""Training: devices and the plan, the fit loop, callbacks, backups and resume.

- ``devices``: what the machine has, and the strategy/precision/XLA plan for it;
- ``loop``: ``fit`` builds the model under the strategy, runs a pre-flight step
  (falling back when a combination breaks), trains and evaluates;
- ``callbacks``: epoch statistics, the confusion matrix, lookahead, layer
  freezing, alternating flip, per-epoch test, and ``RunState`` (backups);
- ``backups``: saving and restoring a run's full training state;
- ``distributed`` and ``compat``: multi-worker clusters and Keras fixes;
- ``optimizers``, ``schedules``, ``adversarial``: what the config can choose.
"""
