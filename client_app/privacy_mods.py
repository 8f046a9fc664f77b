"""Client-side privacy mods: Flower's DP mods and SecAgg+ mod, fitted to FedDMMR's messages.

Flower's ``fixedclipping_mod`` / ``LocalDpMod`` expect exactly one ArrayRecord in the message and
in the reply, with the same keys; ``secaggplus_mod`` expects the legacy ``fitres.*`` reply layout
and clears every ArrayRecord of the reply. A FedDMMR train message carries the *full* model plus
the global prototypes, and the reply only the stage's trainable tensors plus the client's
prototypes. The adapters below present each Flower mod with the layout it expects and put
FedDMMR's records back afterwards; the privacy work itself (clipping, noise, masking) is
Flower's own code.

``privacy_mod`` is always installed (``ClientApp(mods=[wire_mod, privacy_mod])``) and decides per message:
a message with a ``secaggplus`` ConfigRecord runs the SecAgg+ protocol; otherwise run-config
``dp-mode`` picks ``fixedclipping_mod`` ("central-fixed"), ``LocalDpMod`` ("local") or nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from feddmmr_flower.client import runtime_for
from feddmmr_wire import SecAggPlaintext, TrainInstruction, TrainReply, TrainStatus, to_array
from feddmmr_wire.keys import ARRAYS, CONFIG, METRICS, SECAGG_EXTRAS, STATUS

from .context import experiment_config

Next = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, Next], Message]
NOTHING_TO_TRAIN_CODE = 601  # error code only a wrapped DP mod sees: it returns error replies untouched


def _zero_update(msg: Message, reply: Message) -> bool:
    """Flower's clipping divides by the update norm: an all-zero update must bypass it."""
    sent, received = reply.content.array_records[ARRAYS], msg.content.array_records[ARRAYS]
    return all(np.array_equal(sent[n].numpy(), received[n].numpy()) for n in sent.keys())


def single_record(inner: Mod) -> Mod:
    """Run a one-ArrayRecord Flower mod (fixedclipping_mod, LocalDpMod) on a FedDMMR train message.

    The mod sees the full model as the message's ArrayRecord and a reply with the full model too:
    the stage's trained tensors plus the frozen ones unchanged (a zero update, so a clipping norm
    over the full model equals the norm over the trained subset). Afterwards the reply is cut back
    to the trained tensors (noise a mod put on frozen tensors is dropped with them) and the
    prototypes are put back. A "nothing to train" reply has no update to clip or noise: the mod sees
    an error reply (which Flower's DP mods pass on untouched) and the node's reply goes out as it is.
    """

    def mod(msg: Message, ctx: Context, call_next: Next) -> Message:
        full = msg.content.array_records[ARRAYS]
        view = copy.copy(msg)
        view.content = RecordDict({ARRAYS: full, CONFIG: msg.content.config_records[CONFIG]})
        kept: dict = {}

        def next_(_: Message, context: Context) -> Message:
            reply = call_next(msg, context)
            if reply.has_error():
                return reply
            if TrainReply.says_nothing_to_train(reply.content):
                kept["nothing to train"] = reply
                return Message(Error(NOTHING_TO_TRAIN_CODE, "nothing to train"), reply_to=msg)
            if _zero_update(msg, reply):
                arrays = reply.content.array_records[ARRAYS]  # perturbed by 1 ulp so it can be clipped
                reply.content[ARRAYS] = ArrayRecord(
                    {n: Array(np.nextafter(a.numpy(), np.inf)) for n, a in arrays.items()}
                )
            sent = reply.content.array_records[ARRAYS]
            kept["names"] = list(sent.keys())
            kept["others"] = {k: v for k, v in reply.content.items() if k != ARRAYS}
            expanded = ArrayRecord({n: sent[n] if n in sent else full[n] for n in full.keys()})
            out = copy.copy(reply)
            out.content = RecordDict(
                {ARRAYS: expanded, **{k: v for k, v in kept["others"].items() if not isinstance(v, ArrayRecord)}}
            )
            return out

        out = inner(view, ctx, next_)
        if "nothing to train" in kept:
            return kept["nothing to train"]
        if out.has_error() or "names" not in kept:
            return out
        arrays = out.content.array_records[ARRAYS]
        content = RecordDict({ARRAYS: ArrayRecord({n: arrays[n] for n in kept["names"]}), **kept["others"]})
        result = copy.copy(out)
        result.content = content
        return result

    return mod


def legacy_reply(msg: Message, reply: Message, stage_names: Callable[[str], list[str]]) -> Message:
    """FedDMMR reply -> the ``fitres.*`` layout ``secaggplus_mod`` masks: the *update* (trained minus
    received) of each trained tensor, in the model's order. Updates, not weights: a tensor row no
    one touched sums to exactly zero, and the small range of updates quantises finely.

    A "nothing to train" node still masks (its pairwise masks cancel the other nodes' only if it
    takes part): a zero update of the stage's tensors (``stage_names``) with weight 0, which adds
    exactly nothing to the sum or to the total weight; its STATUS record tells the server so."""
    if reply.has_error():
        raise RuntimeError(f"training failed: {reply.error.reason}")
    ins = TrainInstruction.from_content(msg.content)
    received = ins.arrays
    parsed = TrainReply.from_content(reply.content)
    extra = {}
    if parsed.status == TrainStatus.NOTHING_TO_TRAIN:
        wanted = set(stage_names(ins.stage))
        names = [n for n in received if n in wanted]
        updates = {n: np.zeros(np.shape(received[n])) for n in names}
        extra[STATUS] = reply.content.config_records[STATUS]
    else:
        names = [n for n in received if n in parsed.arrays]
        if len(names) != len(parsed.arrays):
            raise ValueError(f"reply tensors not in the model: {sorted(set(parsed.arrays) - set(names))[:5]}")
        updates = {n: parsed.arrays[n].astype(np.float64) - received[n].astype(np.float64) for n in names}
    plain = SecAggPlaintext(names, centroids=parsed.centroids, sizes=parsed.sizes)
    if not all(np.isfinite(u).all() for u in updates.values()):
        # Masked NaN would corrupt the whole sum. Withhold: zeros go into the protocol, the server
        # drops this reply before summing (a dropout SecAgg+ recovers from) and logs why.
        updates = {n: np.zeros_like(u) for n, u in updates.items()}
        plain.withheld = "non-finite model update (NaN/Inf)"
    content = RecordDict(
        {
            "fitres.parameters": ArrayRecord({n: to_array(u) for n, u in updates.items()}),
            "fitres.num_examples": MetricRecord({"num_examples": int(parsed.num_examples)}),
            "fitres.metrics": ConfigRecord({}),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
            METRICS: reply.content.metric_records[METRICS],
            SECAGG_EXTRAS: plain.to_record(),
            **extra,
        }
    )
    return Message(content, reply_to=msg)


def privacy_mod(msg: Message, ctx: Context, call_next: Next) -> Message:
    """Dispatch a train message to SecAgg+ and/or the DP mod the run configures."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctx)
    cfg = experiment_config(ctx)
    dp: Mod | None = None
    if cfg.dp_mode == "central-fixed":
        dp = single_record(fixedclipping_mod)
    elif cfg.dp_mode == "local":
        clip = cfg.dp_clipping_norm
        dp = single_record(LocalDpMod(clip, clip, cfg.dp_epsilon, cfg.dp_delta))
    train: Next = call_next if dp is None else (lambda m, c: dp(m, c, call_next))
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        # (the runtime's stage names are read after the train handler ran: it built the runtime)
        return secaggplus_mod(msg, ctx, lambda m, c: legacy_reply(m, train(m, c), runtime_for(cfg).trainable_names))
    return train(msg, ctx)
