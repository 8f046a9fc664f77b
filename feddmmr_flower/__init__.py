"""FedDMMR core library: data, models, memory, training and evaluation.

Nothing in this package imports Flower (``tests/test_architecture.py`` checks it), so it can be
used (and tested) as a plain PyTorch recommender; the Flower apps in ``client_app/``,
``server_app/`` and ``strategies/`` are thin adapters over it, and talk to each other only
through ``feddmmr_wire/``.
"""

__version__ = "0.1.0"
