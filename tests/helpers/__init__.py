"""What the tests share: process launchers, tiny models and data, references, workers.

Only tests/ is on sys.path (pyproject's pytest `pythonpath`), so these import as `helpers.<module>`;
no test imports another test file.
"""
