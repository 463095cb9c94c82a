"""`make demo`: the whole product on a laptop CPU (pipeline.py), and the synthetic data it learns (data.py)."""
