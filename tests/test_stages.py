"""Stages (DESIGN §4): named parameter groups, what each stage trains, exchanging exactly those
tensors, and a tiny centralized run through the whole schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from feddmmr_flower import checkpoint
from feddmmr_flower.central import train_central
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.data.sequences import SequenceData
from feddmmr_flower.errors import ConfigError
from feddmmr_flower.experiment import memory_config, train_config
from feddmmr_flower.local_training import refresh_memory, train_epoch
from feddmmr_flower.memory import LocalDynamicMemory
from feddmmr_flower.models.feddmmr import FedDMMR, FedDMMRConfig
from feddmmr_flower.stages import StageSchedule, apply_stage, load_arrays, trainable_names, trainable_state

from .conftest import distinct_item_data

NUM_ITEMS, HIDDEN, MAXLEN = 30, 16, 12
PROJECTIONS = {"proj_vis.weight", "proj_vis.bias", "proj_txt.weight", "proj_txt.bias"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_data(num_users: int = 8, seed: int = 0) -> SequenceData:
    return distinct_item_data(num_users, NUM_ITEMS, seed)


def tiny_model(variant: str = "full", seed: int = 0) -> FedDMMR:
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
    vis, txt = rng.normal(size=(NUM_ITEMS + 1, 512)), rng.normal(size=(NUM_ITEMS + 1, 384))
    vis /= np.linalg.norm(vis, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    vis_ok, txt_ok = np.ones(NUM_ITEMS + 1, bool), np.ones(NUM_ITEMS + 1, bool)
    vis_ok[[0, 3, 7]] = False
    txt_ok[[0, 5, 7]] = False
    model.set_features(vis * vis_ok[:, None], vis_ok, txt * txt_ok[:, None], txt_ok)
    return model


def snapshot(model: FedDMMR) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_names(before: dict[str, torch.Tensor], model: FedDMMR) -> set[str]:
    after = model.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def one_step(
    model: FedDMMR, data: SequenceData, stage: str, memory: LocalDynamicMemory | None = None, lr: float = 1e-2
) -> set[str]:
    """One optimiser step of ``stage`` over all users (one batch); returns the changed tensors."""
    users = np.arange(data.num_users)
    config = train_config(num_negatives=5, batch_size=len(users), lambda_c=0.5, lambda_lb=0.01)
    optimizer = torch.optim.Adam(apply_stage(model, stage), lr=lr)
    before = snapshot(model)
    train_epoch(model, data, users, users, optimizer, config, stage, memory, None, torch.Generator().manual_seed(0))
    return changed_names(before, model)


def filled_memory(model: FedDMMR, data: SequenceData) -> LocalDynamicMemory:
    memory = LocalDynamicMemory(data.num_users, memory_config(capacity=12, topk=8, surprise_threshold=0.0))
    users = np.arange(data.num_users)
    refresh_memory(model, data, users, users, memory, train_config(num_negatives=5), torch.Generator().manual_seed(0))
    assert (memory.item > 0).sum(1).min() > 0
    return memory


# ---------------------------------------------------------------------------- groups
@pytest.mark.parametrize("variant", ["full", "sasrec"])
def test_parameter_groups_partition_all_parameters(variant: str) -> None:
    """Every parameter is in exactly one named group and the groups cover the model, resolved from
    module objects: the attention's ``out``/``qkv`` tensors belong to the backbone, never to the
    projections (the prototype's substring matching got this wrong)."""
    model = tiny_model(variant)
    groups = model.parameter_groups()
    names = [name for group in groups.values() for name in group]
    assert len(names) == len(set(names)), "a parameter is in two groups"
    assert set(names) == {name for name, _ in model.named_parameters()}
    assert set(groups["projections"]) == PROJECTIONS
    assert groups["item_embedding"] == ["backbone.item_emb.weight"]
    assert {
        "backbone.blocks.0.attn.out.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.pos_emb.weight",
        "backbone.final_norm.weight",
    } <= set(groups["backbone"])
    assert set(groups["norms"]) == {"norm_vis.weight", "norm_vis.bias", "norm_sem.weight", "norm_sem.bias"}
    assert all(n.startswith("router.") for n in groups["router"]) and groups["router"]
    assert all(n.split(".")[0] in ("vis_expert", "sem_expert") for n in groups["experts"])


def test_apply_stage_freezes_the_model_itself() -> None:
    """Freezing is set on the very model the step uses (not a copy): requires_grad matches the stage
    and the returned parameters are exactly the trainable ones."""
    model = tiny_model()
    for stage in ("pretrain", "align", "finetune"):
        params = apply_stage(model, stage)
        expected = set(trainable_names(model, stage))
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
        assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in expected}


# ---------------------------------------------------------------------- stage steps
def test_pretrain_step_trains_only_item_embedding_and_backbone() -> None:
    """Stage 1: experts off; the item embedding and the backbone move, nothing else does."""
    model = tiny_model()
    data = tiny_data()
    groups = model.parameter_groups()
    changed = one_step(model, data, "pretrain", filled_memory(model, data))
    assert changed == set(groups["item_embedding"]) | set(groups["backbone"])


def test_align_step_changes_only_the_projections() -> None:
    """Stage 2: only proj_vis/proj_txt train (through their own InfoNCE against the frozen ID
    embeddings); every other state tensor stays bit-identical."""
    model = tiny_model()
    data = tiny_data()
    changed = one_step(model, data, "align")
    assert changed == PROJECTIONS


def test_finetune_step_freezes_the_item_embedding_and_trains_the_rest() -> None:
    """Stage 3 from a zero-initialised fusion: the item embedding is frozen; backbone, projections,
    experts (reached by the InfoNCE), router (load balance) and norms all move in one step."""
    model = tiny_model()
    data = tiny_data()
    memory = filled_memory(model, data)
    groups = model.parameter_groups()
    changed = one_step(model, data, "finetune", memory)
    assert "backbone.item_emb.weight" not in changed
    assert changed == set(trainable_names(model, "finetune")), sorted(set(trainable_names(model, "finetune")) - changed)
    for group in ("backbone", "projections", "experts", "router", "norms"):
        assert set(groups[group]) <= changed, group


@pytest.mark.parametrize("stage", ["pretrain", "align", "finetune"])
def test_sasrec_variant_trains_embedding_and_backbone_in_every_stage(stage: str) -> None:
    """The plain SASRec baseline has no experts: in every stage (align included, which falls back
    to the recommendation loss) it trains the item embedding + backbone and only those."""
    model = tiny_model("sasrec")
    data = tiny_data()
    groups = model.parameter_groups()
    expected = set(groups["item_embedding"]) | set(groups["backbone"])
    assert set(trainable_names(model, stage)) == expected
    memory = LocalDynamicMemory(data.num_users, memory_config(capacity=12, topk=8, surprise_threshold=0.0))
    assert one_step(model, data, stage, memory) == expected


# ------------------------------------------------------------------ exchanged tensors
def test_trainable_state_of_align_is_the_projections_only() -> None:
    """Frozen tensors are never sent: in `align` a client exchanges the four projection tensors,
    as independent numpy copies equal to the model's values."""
    model = tiny_model()
    arrays = trainable_state(model, "align")
    assert set(arrays) == PROJECTIONS
    state = model.state_dict()
    for name, value in arrays.items():
        assert isinstance(value, np.ndarray) and np.array_equal(value, state[name].numpy())
    arrays["proj_vis.weight"][:] = 123.0
    assert not (model.proj_vis.weight == 123.0).any()
    assert set(trainable_state(model, "finetune")) == set(trainable_names(model, "finetune"))
    assert "backbone.item_emb.weight" not in trainable_state(model, "finetune")


def test_load_arrays_validates_everything_before_loading_anything() -> None:
    """A reply with an unknown name, a wrong shape, NaN/Inf, or a name outside ``allowed`` raises
    ValueError and leaves the model untouched (all or nothing); a good set loads exactly."""
    model = tiny_model()
    good = {name: np.full(v.shape, 0.25, np.float32) for name, v in trainable_state(model, "align").items()}
    w_shape = model.proj_vis.weight.shape
    cases = {
        "unknown": {"proj_vis.weight": good["proj_vis.weight"], "nope.weight": np.zeros(3, np.float32)},
        "buffer": {"proj_vis.weight": good["proj_vis.weight"], "vis_feat": np.zeros((31, 512), np.float32)},
        "shape": {"proj_vis.weight": good["proj_vis.weight"], "proj_txt.bias": np.zeros(HIDDEN + 1, np.float32)},
        "nan": {"proj_vis.weight": good["proj_vis.weight"], "proj_txt.weight": np.full((HIDDEN, 384), np.nan)},
        "inf": {"proj_vis.weight": good["proj_vis.weight"], "proj_txt.bias": np.full(HIDDEN, np.inf)},
    }
    for label, arrays in cases.items():
        before = snapshot(model)
        with pytest.raises(ValueError):
            load_arrays(model, arrays)
        assert changed_names(before, model) == set(), f"{label}: something was loaded"
    before = snapshot(model)
    with pytest.raises(ValueError, match="unexpected"):
        load_arrays(
            model,
            {**good, "backbone.item_emb.weight": model.item_emb.weight.detach().numpy()},
            allowed=trainable_names(model, "align"),
        )
    assert changed_names(before, model) == set()
    load_arrays(model, good, allowed=trainable_names(model, "align"))
    assert changed_names(before, model) == PROJECTIONS
    assert (model.proj_vis.weight == 0.25).all() and model.proj_vis.weight.shape == w_shape


def test_stage_schedule_basics() -> None:
    """The schedule string used by the runs: rounds map to stages in order; unknown stages fail."""
    schedule = StageSchedule.parse("pretrain:2,align:1,finetune:2")
    assert schedule.total_rounds == 5
    assert [schedule.stage_for_round(r) for r in range(1, 6)] == ["pretrain"] * 2 + ["align"] + ["finetune"] * 2
    assert str(schedule) == "pretrain:2,align:1,finetune:2"
    with pytest.raises(ConfigError):
        StageSchedule.parse("warmup:1")
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        StageSchedule.parse("")


# ------------------------------------------------------------------------ central run
def test_train_central_runs_the_whole_schedule(tmp_path) -> None:
    """End to end on a tiny dataset: pretrain:2,align:1,finetune:2 with memory and prototypes.
    The result has test metrics under both protocols (all in [0, 1]), a history that records the
    stage of every epoch, a checkpoint and the run record files; the memory holds no held-out target."""
    data = tiny_data()
    model = tiny_model()
    memory = LocalDynamicMemory(data.num_users, memory_config(capacity=12, topk=8, surprise_threshold=0.5))
    cfg = ExperimentConfig(
        stage_schedule="pretrain:2,align:1,finetune:2",
        batch_size=4,
        negatives=5,
        eval_every=1,
        eval_negatives=10,
        patience=10,
        lr=1e-2,
    )
    lines: list[str] = []
    result = train_central(model, data, cfg, memory, out_dir=tmp_path, log=lines.append)
    assert set(result.test) == {"sampled", "full"}
    for protocol, metrics in result.test.items():
        assert {"HR@10", "NDCG@10", "MRR"} <= set(metrics), protocol
        assert all(0.0 <= v <= 1.0 for v in metrics.values()), (protocol, metrics)
    assert [(r["round"], r["stage"]) for r in result.history] == [
        (1, "pretrain"),
        (2, "pretrain"),
        (3, "align"),
        (4, "finetune"),
        (5, "finetune"),
    ]
    assert all(0 <= r["valid"]["NDCG@10"] <= 1 for r in result.history)
    assert 1 <= result.best_epoch <= 5 and result.best_stage == result.history[result.best_epoch - 1]["stage"]
    assert "align" in result.history[2]["train"] and "rec" in result.history[3]["train"]
    assert "memory-size" in result.history[4]["train"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kind"] == "central" and summary["best_round"] == result.best_epoch
    assert summary["test"]["sampled"]["NDCG@10"] == pytest.approx(result.test["sampled"]["NDCG@10"], abs=1e-6)
    assert len(json.loads((tmp_path / "history.json").read_text())["rounds"]) == 5
    assert json.loads((tmp_path / "config.json").read_text())["experiment"]["stage-schedule"] == cfg.stage_schedule
    saved = checkpoint.load(tmp_path / "best.pt")
    assert saved.kind == "central" and saved.round == result.best_epoch and saved.stage == result.best_stage
    assert set(saved.state_dict) == set(model.state_dict())
    assert saved.memory_bank() is not None and len(saved.memory_bank().step) == data.num_users
    assert len(lines) >= 6
    for u in range(data.num_users):  # memory never learned a held-out target
        stored = set(memory.item[u][memory.item[u] > 0].tolist())
        assert not stored & {int(data.target([u], "valid")[0]), int(data.target([u], "test")[0])}


@pytest.mark.parametrize(
    "earlier, done, later, ok",
    [
        ("pretrain:2,align:1", 3, "pretrain:2,align:1", True),  # same schedule
        ("pretrain:2,align:1", 3, "pretrain:2,align:3", True),  # more rounds of the current stage
        ("pretrain:2,align:1", 3, "pretrain:2,align:1,finetune:4", True),  # a later stage added
        ("pretrain:4,align:1", 2, "pretrain:3,align:1", True),  # the unfinished stage shortened, not below done
        ("pretrain:4,align:1", 2, "pretrain:1,align:1", False),  # round 2 would now be align
        ("pretrain:2,align:1", 3, "pretrain:3,align:1", False),  # round 3 was align
        ("pretrain:2,align:1", 3, "align:1,pretrain:2", False),
        ("pretrain:2,align:2", 4, "pretrain:2,align:1", False),  # fewer rounds than done
    ],
)
def test_a_resumed_schedule_must_continue_the_rounds_already_done(earlier, done, later, ok) -> None:
    assert StageSchedule.parse(later).continues(StageSchedule.parse(earlier), done) is ok
