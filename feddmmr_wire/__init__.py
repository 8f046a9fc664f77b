"""The wire between FedDMMR's server and its clients: record keys, the packed model, typed messages.

The one package with Flower-dependent code that both sides share: ``client_app``, ``strategies``
and ``server_app`` import it and never each other. ``keys`` names every record entry once,
``arrays``/``packing`` move numpy arrays through Flower records fast, and ``messages`` holds the
four FedDMMR messages with their ``to_content``/``from_content`` conversions.
"""

from .arrays import from_array, to_array, to_numpy, to_record
from .messages import (
    EvaluateInstruction,
    EvaluateReply,
    MessageError,
    SecAggPlaintext,
    TrainInstruction,
    TrainReply,
    TrainStatus,
    evaluate_settings,
    round_entries,
    train_settings,
)
from .packing import arrays_records, is_packed, pack, pack_content, packable, read_arrays, unpack, unpack_content

__all__ = [
    "EvaluateInstruction",
    "EvaluateReply",
    "MessageError",
    "SecAggPlaintext",
    "TrainInstruction",
    "TrainReply",
    "TrainStatus",
    "arrays_records",
    "evaluate_settings",
    "from_array",
    "is_packed",
    "pack",
    "pack_content",
    "packable",
    "read_arrays",
    "round_entries",
    "to_array",
    "to_numpy",
    "to_record",
    "train_settings",
    "unpack",
    "unpack_content",
]
