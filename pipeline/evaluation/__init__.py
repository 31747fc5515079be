"""Evaluation: metrics, pictures, adversarial attacks and a run's evaluation report.

``metrics`` and ``plots`` are plain NumPy/Pillow (training's confusion-matrix
callback uses them too); ``attacks`` holds FGSM/PGD and the robustness report;
``tta`` averages a model's logits over mirrored and shifted views;
``report`` evaluates a finished run and writes ``<run_dir>/eval/``.
"""
