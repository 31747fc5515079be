"""The run directory: what a run writes, and reading it back.

- ``manifest``: the manifest (versions, commit, devices, data) and JSON records;
- ``reader``: a finished run's config, manifest, checkpoints and model;
- ``hashes``: every artifact's SHA-256 in the manifest, checked before it is loaded;
- ``target``: which run ``resume=`` continues, and whether it may;
- ``hparams``: a run's hyperparameters and final metrics for TensorBoard;
- ``sweep``: multirun records (failures, the sweep summary, one GPU per job).
"""
