"""FedDMMR core library: data, models, memory, training and evaluation.

Nothing in this package imports Flower, so it can be used (and tested) as a plain
PyTorch recommender; the Flower apps in ``client_app/``, ``server_app/`` and
``strategies/`` are thin adapters over it.
"""

__version__ = "0.1.0"
