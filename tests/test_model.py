"""FedDMMR model: zero-init fusion, no future leakage, vectorised experts = a naive reference.

Tiny models (hidden 16, maxlen 12, 30 items) with random unit-norm "CLIP"/"SBERT" features.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from feddmmr_flower.data.sequences import SequenceData
from feddmmr_flower.experiment import memory_config, train_config
from feddmmr_flower.local_training import batch_loss, make_batch, memory_slots, refresh_memory, train_epoch
from feddmmr_flower.memory import NEVER, LocalDynamicMemory
from feddmmr_flower.models.experts import info_nce
from feddmmr_flower.models.feddmmr import FedDMMR, FedDMMRConfig
from feddmmr_flower.stages import apply_stage

from .conftest import distinct_item_data

NUM_ITEMS, HIDDEN, MAXLEN = 30, 16, 12
NO_IMAGE = (3, 7, 11)  # items without a poster
NO_TEXT = (5, 7, 13)  # items without a text (7 has neither)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- helpers
def tiny_data(num_users: int = 6, seed: int = 0, min_len: int = 8, max_len: int = 14) -> SequenceData:
    return distinct_item_data(num_users, NUM_ITEMS, seed, min_len, max_len)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def tiny_model(variant: str = "full", seed: int = 0, active_norms: bool = False) -> FedDMMR:
    torch.manual_seed(seed)
    model = FedDMMR(
        FedDMMRConfig(
            num_items=NUM_ITEMS,
            hidden=HIDDEN,
            maxlen=MAXLEN,
            num_blocks=1,
            dropout=0.0,
            variant=variant,
            expert_heads=2,
        )
    )
    rng = np.random.default_rng(seed)
    vis, txt = unit_rows(rng, NUM_ITEMS + 1, 512), unit_rows(rng, NUM_ITEMS + 1, 384)
    vis_ok, txt_ok = np.ones(NUM_ITEMS + 1, bool), np.ones(NUM_ITEMS + 1, bool)
    vis_ok[[0, *NO_IMAGE]] = False
    txt_ok[[0, *NO_TEXT]] = False
    vis[~vis_ok] = 0
    txt[~txt_ok] = 0
    model.set_features(vis, vis_ok, txt, txt_ok)
    if active_norms:
        randomise_norms(model, seed)
    model.eval()
    return model


def randomise_norms(model: FedDMMR, seed: int = 0) -> None:
    """Non-zero LN gains/biases so that the expert branches contribute to the score."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for norm in (model.norm_vis, model.norm_sem):
            norm.weight.copy_(torch.randn(HIDDEN, generator=g))
            norm.bias.copy_(0.5 * torch.randn(HIDDEN, generator=g))


def filled_memory(data: SequenceData, users: np.ndarray, capacity: int = 16, seed: int = 0):
    """A memory holding every training target of ``users`` (threshold 0, no write cap)."""
    memory = LocalDynamicMemory(
        len(users), memory_config(capacity=capacity, topk=capacity, surprise_threshold=0.0, max_writes=MAXLEN)
    )
    batch = make_batch(data, users, np.arange(len(users)), MAXLEN)
    real = batch.targets > 0
    loss = torch.rand(batch.targets.shape, generator=torch.Generator().manual_seed(seed)) + 0.1
    memory.write(batch.rows, batch.targets, batch.target_positions, loss * real)
    assert ((memory.item > 0).sum(1) == real.sum(1)).all()  # every training target is stored
    return memory, batch


# -------------------------------------------------------------------------- zero init
def test_zero_init_experts_score_like_sasrec_until_the_first_finetune_step() -> None:
    """DESIGN §2: the LN gains/biases start at 0, so switching the experts on changes no score
    (train logits on both negative layouts, and evaluation scores with memory slots); one finetune
    Adam step must open the branches (norm gains and, through the InfoNCE, the expert MLPs move)
    and then the scores differ from the plain SASRec ones."""
    data = tiny_data()
    model = tiny_model()
    for norm in (model.norm_vis, model.norm_sem):
        assert not norm.weight.any() and not norm.bias.any()
    users = np.arange(data.num_users)
    memory, batch = filled_memory(data, users)
    protos = torch.randn(2, model.config.prototype_dim)
    slots = memory_slots(model, memory, batch.rows, protos)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(1, NUM_ITEMS + 1, (len(users), 7), generator=g)
    per_pos = torch.randint(1, NUM_ITEMS + 1, (len(users), MAXLEN, 5), generator=g)
    cands = torch.randint(1, NUM_ITEMS + 1, (len(users), 9), generator=g)
    with torch.no_grad():
        hidden = model.encode(batch.inputs)
        for negatives in (shared, per_pos):
            on = model.train_logits(hidden, batch.targets, batch.target_positions, negatives, slots, True)
            off = model.train_logits(hidden, batch.targets, batch.target_positions, negatives, slots, False)
            assert "vis" in on and "vis" not in off  # the expert path really ran
            torch.testing.assert_close(on["pos"], off["pos"], atol=1e-5, rtol=0)
            torch.testing.assert_close(on["neg"], off["neg"], atol=1e-5, rtol=0)
        for c in (cands, None):
            torch.testing.assert_close(
                model.score(hidden[:, -1], c, slots), model.score(hidden[:, -1], c, None), atol=1e-5, rtol=0
            )

    model.train()
    config = train_config(num_negatives=5, lambda_c=0.5, lambda_lb=0.01, batch_size=len(users))
    optimizer = torch.optim.Adam(apply_stage(model, "finetune"), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _, parts = batch_loss(model, batch, config, "finetune", slots, torch.Generator().manual_seed(0))
    assert "align" in parts, "the InfoNCE must take part in this batch (positions where both experts have input)"
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for name in ("norm_vis.weight", "norm_sem.weight"):
        assert name in changed, f"{name} did not move: the zero-initialised branch never opens"
    for expert in ("vis_expert", "sem_expert"):
        for part in ("query.weight", "key.weight", "value.0.weight", "value.2.weight"):
            assert f"{expert}.{part}" in changed, f"{expert}.{part} unchanged although the InfoNCE reaches it"
    assert "backbone.item_emb.weight" not in changed  # finetune freezes the item embedding
    model.eval()
    with torch.no_grad():
        hidden = model.encode(batch.inputs)
        gap = (model.score(hidden[:, -1], cands, slots) - model.score(hidden[:, -1], cands, None)).abs().max()
    assert gap > 1e-4, "after a finetune step the experts must change the scores"


def test_at_zero_init_only_the_norm_gains_get_recommendation_gradient() -> None:
    """With λ_c = λ_lb = 0 the recommendation loss cannot reach experts or router through a zero
    gain (their gradient is exactly 0) but does reach the gains: that is why the design puts the
    zero scale *after* the LN and adds the InfoNCE on the pre-norm outputs."""
    data = tiny_data()
    model = tiny_model()
    memory, batch = filled_memory(data, np.arange(data.num_users))
    slots = memory_slots(model, memory, batch.rows, None)
    apply_stage(model, "finetune")
    config = train_config(num_negatives=5, lambda_c=0.0, lambda_lb=0.0)
    loss, _, parts = batch_loss(model, batch, config, "finetune", slots, torch.Generator().manual_seed(0))
    assert set(parts) == {"rec"}
    loss.backward()
    for module in (model.vis_expert, model.sem_expert, model.router):
        for name, p in module.named_parameters():
            assert p.grad is None or not p.grad.any(), name
    assert model.norm_vis.weight.grad.abs().sum() > 0 and model.norm_sem.weight.grad.abs().sum() > 0


# -------------------------------------------------------------------------- no leakage
def _corrupt_from(items: torch.Tensor, positions: torch.Tensor, row: int, p: int) -> torch.Tensor:
    """Replace the memory items of ``row`` whose source position is >= p by other real items."""
    changed = items.clone()
    late = (positions[row] >= p) & (items[row] > 0)
    changed[row, late] = (items[row, late] + 7) % NUM_ITEMS + 1
    assert (changed[row, late] != items[row, late]).all()
    return changed


@pytest.mark.parametrize("layout", ["shared", "per_position"])
def test_memory_entries_from_the_target_position_on_are_invisible(layout: str) -> None:
    """DESIGN §3/§7: at sequence position j (target at source position p) the experts may only see
    memory entries written from positions < p. Replacing every entry with position >= p (which
    includes the target itself) must leave the logits at j bit-for-bit the same, while a later
    position that can see those entries must change (so the check is sensitive)."""
    data = tiny_data()
    model = tiny_model(active_norms=True)
    users = np.arange(data.num_users)
    memory, batch = filled_memory(data, users)
    items, positions = memory.retrieve(batch.rows)
    protos = torch.randn(2, model.config.prototype_dim, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(2)
    negatives = (
        torch.randint(1, NUM_ITEMS + 1, (len(users), 6), generator=g)
        if layout == "shared"
        else torch.randint(1, NUM_ITEMS + 1, (len(users), MAXLEN, 6), generator=g)
    )
    row = 0
    real = (batch.targets[row] > 0).nonzero().flatten()
    j, last = int(real[len(real) // 2]), int(real[-1])
    p = int(batch.target_positions[row, j])
    assert int(batch.target_positions[row, last]) > p
    assert batch.targets[row, j] in items[row, positions[row] >= p]  # the target itself is in memory
    with torch.no_grad():
        hidden = model.encode(batch.inputs)

        def logits(mem_items):
            out = model.train_logits(
                hidden,
                batch.targets,
                batch.target_positions,
                negatives,
                model.slots(mem_items, positions, protos),
                True,
            )
            neg = out["neg"]
            return out["pos"][row], neg[row]

        pos_a, neg_a = logits(items)
        pos_b, neg_b = logits(_corrupt_from(items, positions, row, p))
    for k in range(j + 1):  # every position up to j (targets at positions <= p) is unaffected
        assert torch.equal(pos_a[k], pos_b[k]) and torch.equal(neg_a[k], neg_b[k]), f"leak at position {k}"
    late_change = max(float((pos_a[last] - pos_b[last]).abs()), float((neg_a[last] - neg_b[last]).abs().max()))
    assert late_change > 1e-5, "a later position must see the replaced entries (test not sensitive)"


def test_training_never_writes_held_out_targets_to_memory() -> None:
    """DESIGN §7 (the prototype's "candidate ∈ memory ⇒ positive" shortcut): after local training
    passes (pretrain and finetune) and a refresh, no user's memory holds its validation or test
    target, and every stored source position is a training position (1 .. n-3)."""
    data = tiny_data(num_users=6)
    model = tiny_model()
    users = np.arange(data.num_users)
    memory = LocalDynamicMemory(
        data.num_users, memory_config(capacity=16, topk=8, surprise_threshold=0.0, max_writes=MAXLEN)
    )
    config = train_config(num_negatives=5, batch_size=4, lambda_c=0.1)
    g = torch.Generator().manual_seed(0)
    for stage, epochs in (("pretrain", 2), ("finetune", 2)):
        optimizer = torch.optim.Adam(apply_stage(model, stage), lr=1e-3)
        for _ in range(epochs):
            order = np.random.default_rng(epochs).permutation(users)
            stats = train_epoch(model, data, order, order, optimizer, config, stage, memory, None, g)
            assert stats["memory_writes"] > 0
    refresh_memory(model, data, users, users, memory, config, g)
    valid, test = data.target(users, "valid"), data.target(users, "test")
    for u in users:
        stored = memory.item[u][memory.item[u] > 0].numpy()
        assert len(stored) > 0
        assert valid[u] not in stored and test[u] not in stored, f"user {u} memory holds a held-out item"
        pos = memory.position[u][memory.item[u] > 0]
        assert pos.min() >= 1 and pos.max() <= data.lengths[u] - 3
        seq = data.sequence(u)
        assert all(seq[int(q)] == int(i) for q, i in zip(pos, stored))  # position = where the item occurred


# ---------------------------------------------------------------- vectorised = naive loops
def _ln(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return (x - mean) / math.sqrt(float(var) + eps) * gain + bias


def _attend(expert, query: torch.Tensor, slot_vecs: list[torch.Tensor]) -> torch.Tensor:
    """One expert's output for one query over a list of slot vectors (plain loops)."""
    heads = expert.heads
    dh = query.shape[0] // heads
    q = expert.query(query)
    keys = [expert.key(s) for s in slot_vecs]
    values = [expert.value(s) for s in slot_vecs]
    out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        qh = q[sl] / q[sl].norm()
        logits = torch.stack([expert.scale * (qh @ (k[sl] / k[sl].norm())) for k in keys])
        w = torch.softmax(logits, 0)
        out.append(sum(w[s] * values[s][sl] for s in range(len(slot_vecs))))
    return torch.cat(out)


def reference_term(ref: FedDMMR, cand: int, slot_raw: list[tuple], k: int) -> float:
    """Expert term of candidate ``cand`` seeing the first ``k`` slots, in float64 with loops.

    ``slot_raw``: per slot (image feature or None, text feature or None), prototypes first."""
    emb = ref.item_emb.weight[cand]
    vis_slots = [ref.proj_vis(v) for v, _ in slot_raw[:k] if v is not None]
    txt_slots = [ref.proj_txt(t) for _, t in slot_raw[:k] if t is not None]
    available = [bool(ref.vis_avail[cand]) and len(vis_slots) > 0, len(txt_slots) > 0]
    if not any(available):
        return 0.0
    logits = ref.router(emb)
    exp = [math.exp(float(logits[e])) if available[e] else 0.0 for e in range(2)]
    weights = [x / sum(exp) for x in exp]
    term = 0.0
    if available[0]:
        vis = _attend(ref.vis_expert, ref.proj_vis(ref.vis_feat[cand]), vis_slots)
        term += weights[0] * float(_ln(vis, ref.norm_vis.weight, ref.norm_vis.bias, ref.norm_vis.eps) @ emb)
    if available[1]:
        sem = _attend(ref.sem_expert, emb, txt_slots)
        term += weights[1] * float(_ln(sem, ref.norm_sem.weight, ref.norm_sem.bias, ref.norm_sem.eps) @ emb)
    return term


def test_vectorised_experts_match_a_naive_per_candidate_reference() -> None:
    """DESIGN §2: experts and router are vectorised over (batch × candidates) and training uses a
    closed-form prefix score. All three code paths (``score`` with every slot visible,
    ``expert_terms`` with a visible-slot count, ``expert_prefix_terms`` for every prefix length)
    must equal a float64 loop over candidates and slots: cosine attention over the visible slots
    that have the modality, value MLP, active LayerNorm, router softmax over the available experts,
    dot with the candidate embedding. Slots include prototypes (one without text, one without
    image), items without image/text, and empty slots."""
    model = tiny_model(active_norms=True, seed=4)
    ref = copy.deepcopy(model).double()
    d, t = HIDDEN, 384
    g = torch.Generator().manual_seed(5)
    protos = torch.randn(3, model.config.prototype_dim, generator=g)
    protos[1, d : d + t] = 0  # prototype without text
    protos[2, d + t :] = 0  # prototype without image
    items = torch.tensor([[1, 3, 5, 7, 9, 0, 0, 0], [2, 4, 6, 8, 10, 12, 14, 16], [7, 0, 0, 0, 0, 0, 0, 0]])
    positions = torch.tensor(
        [
            [1, 2, 4, 5, 7, NEVER, NEVER, NEVER],
            [1, 2, 3, 4, 5, 6, 7, 8],
            [3, NEVER, NEVER, NEVER, NEVER, NEVER, NEVER, NEVER],
        ]
    )
    cands = torch.tensor([[1, 3, 5, 7, 11, 13, 20, 25], [2, 3, 7, 13, 16, 17, 29, 30], [7, 3, 5, 6, 11, 13, 19, 28]])
    hidden = torch.randn(3, HIDDEN, generator=g)
    visible_count = torch.randint(0, 12, cands.shape, generator=g)

    with torch.no_grad():
        slots = model.slots(items, positions, protos)
        assert slots.vis.shape == (3, 11, HIDDEN) and (slots.positions[:, :3] == -1).all()
        scores = model.score(hidden, cands, slots)
        all_scores = model.score(hidden, None, slots)
        terms = model.expert_terms(cands, slots, visible_count)[0]
        prefix = model.expert_prefix_terms(cands, slots)
        proto64 = protos.double()
        for b in range(3):
            slot_raw = [
                (
                    p[d + t :] if p[d + t :].abs().sum() > 0 else None,
                    p[d : d + t] if p[d : d + t].abs().sum() > 0 else None,
                )
                for p in proto64
            ]
            slot_raw += [
                (ref.vis_feat[i] if ref.vis_avail[i] else None, ref.txt_feat[i] if ref.txt_avail[i] else None)
                for i in items[b].tolist()
            ]
            for q, c in enumerate(cands[b].tolist()):
                expected = [reference_term(ref, c, slot_raw, k) for k in range(len(slot_raw) + 1)]
                base = float(hidden[b].double() @ ref.item_emb.weight[c])
                assert abs(float(scores[b, q]) - (base + expected[-1])) < 1e-4, (b, c)
                assert abs(float(all_scores[b, c]) - float(scores[b, q])) < 1e-5, (b, c)
                k = int(visible_count[b, q])
                assert abs(float(terms[b, q]) - expected[k]) < 1e-4, (b, c, k)
                np.testing.assert_allclose(
                    prefix[b, q].numpy(), np.array(expected), atol=1e-4, rtol=0, err_msg=f"user {b} candidate {c}"
                )
    # The reference is not trivially zero: the experts really contribute.
    assert (scores - model.score(hidden, cands, None)).abs().max() > 1e-2


# ------------------------------------------------------------------------------ losses
def test_info_nce_basics() -> None:
    """The alignment loss: undefined (None) below 2 rows, small for matching pairs, large for a
    mismatch, and a per-sample weight vector of ones equals no weights."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 8, generator=g)
    assert info_nce(a[:1], a[:1], 0.07) is None
    matched = info_nce(a, a, 0.07)
    shuffled = info_nce(a, a.roll(1, 0), 0.07)
    assert float(matched) < float(shuffled)
    torch.testing.assert_close(info_nce(a, a.roll(1, 0), 0.07, torch.ones(6)), shuffled)


def test_align_stage_loss_needs_features_and_reaches_only_projections() -> None:
    """Stage 2 loss: InfoNCE of projected text/image against the (detached) ID embeddings; it must
    not send gradient into the item embedding, and it fails clearly when no item has a feature."""
    model = tiny_model()
    loss = model.align_stage_loss(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8]]))
    loss.backward()
    assert model.item_emb.weight.grad is None
    assert model.proj_vis.weight.grad.abs().sum() > 0 and model.proj_txt.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no item"):
        model.align_stage_loss(torch.tensor([[0, 7]]))  # item 7 has neither text nor image


def test_prefix_scores_stay_exact_for_a_large_attention_scale() -> None:
    """``attention_scale`` is a config field: the closed form must match the direct computation
    (``expert_terms`` with the same visible count) for any temperature, e.g. 30."""
    torch.manual_seed(0)
    model = FedDMMR(
        FedDMMRConfig(
            num_items=NUM_ITEMS,
            hidden=HIDDEN,
            maxlen=MAXLEN,
            num_blocks=1,
            dropout=0.0,
            expert_heads=2,
            attention_scale=30.0,
        )
    )
    rng = np.random.default_rng(0)
    ok = np.r_[False, np.ones(NUM_ITEMS, bool)]
    model.set_features(unit_rows(rng, NUM_ITEMS + 1, 512), ok, unit_rows(rng, NUM_ITEMS + 1, 384), ok)
    randomise_norms(model)
    items = torch.arange(1, 31).view(3, 10)
    cands = torch.arange(1, 31).expand(3, 30)
    with torch.no_grad():
        slots = model.slots(items, torch.arange(1, 11).expand(3, 10).contiguous(), None)
        prefix = model.expert_prefix_terms(cands, slots)
        for k in range(11):
            direct = model.expert_terms(cands, slots, torch.full(cands.shape, k))[0]
            torch.testing.assert_close(prefix[..., k], direct, atol=1e-4, rtol=0)
