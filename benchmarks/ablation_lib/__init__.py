"""The code of ``benchmarks/ablation.py``, one concept per module.

- ``config``: constants, the arm and common configs (``benchmarks/ablation/*.yaml``) and their validation;
- ``assets``: the offline teacher (all-mpnet-base-v2 from its PyPI parts) and students (MiniLM, SmolLM2);
- ``data``: the training data and the (sub)sampled evaluation data;
- ``runs``: losses, training, evaluation and the orchestration of the runs (reference, arm, soup, ``--select``);
- ``report``: ``docs/ablation.md`` and its chart from the stored results.

``benchmarks/ablation.py`` is the command line; it puts ``benchmarks/`` on ``sys.path`` so that this package imports.
"""
