"""pipeline: train image classifiers fast with Keras 3 and TensorFlow.

Entry points: ``python -m pipeline.train`` (see ``conf/``); in code,
``pipeline.train.train(cfg)``.
"""

__version__ = "0.1.0"
