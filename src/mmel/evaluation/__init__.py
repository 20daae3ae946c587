"""The evaluation engine behind ``python evaluate.py``: per-item records and the run fingerprint (records.py), the
Lightning test loop that explains batches of images and scores each item (engine.py), and the run's figures
(figures.py). The program itself is :mod:`mmel.evaluate`."""
