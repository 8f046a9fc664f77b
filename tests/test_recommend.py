"""``feddmmr recommend`` on a tiny trained model (issue #8).

The model is trained by ``feddmmr train-central`` (full variant, every stage) on the 20-user
synthetic dataset; a federated-format copy of its weights is written with the ServerApp's own
checkpoint writer (``feddmmr_flower.checkpoint``), so both kinds of run folder are exercised: central (the saved memories are
used) and federated (no memories: rebuilt like a client that never trained).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from feddmmr_flower import checkpoint
from feddmmr_flower.recommend import Recommender, UnknownUserError, load_run, user_index

from .conftest import distinct_item_data, synthetic_ml100k
from .test_readme import run_feddmmr

pytestmark = pytest.mark.slow
TINY = ["--hidden", "16", "--maxlen", "30", "--negatives", "20", "--eval-negatives", "20", "--eval-every", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("recommend")
    data_dir = synthetic_ml100k(root / "ml-100k")
    central = root / "central-full"
    done = run_feddmmr(
        [
            "feddmmr",
            "train-central",
            "--dataset",
            "ml-100k",
            "--data-dir",
            str(data_dir),
            "--cache-dir",
            str(root / "cache"),
            "--variant",
            "full",
            "--stage-schedule",
            "pretrain:3,align:1,finetune:2",
            "--out",
            str(central),
            *TINY,
        ],
        root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fed = _federated_copy(central, root / "fed-full")
    return {"root": root, "data_dir": data_dir, "central": central, "fed": fed}


def _federated_copy(central: Path, folder: Path) -> Path:
    """The central weights as the ServerApp saves a federated ``best.pt`` (no memories inside)."""
    saved = checkpoint.load(central / "best.pt")
    checkpoint.save(
        folder / "best.pt", replace(saved, kind="federated", memory=None, round=6, stage="finetune", valid=None)
    )
    return folder


@pytest.fixture(scope="module")
def central(trained) -> Recommender:
    return Recommender(load_run(trained["central"]))


@pytest.fixture(scope="module")
def federated(trained) -> Recommender:
    return Recommender(load_run(trained["fed"]))


def _history(rec: Recommender, user: int, part: str = "all") -> set[str]:
    seq = rec.data.sequence(user)
    seq = seq if part == "all" else seq[:-2]  # leave-one-out: the last two are held out
    return {str(rec.data.item_raw_ids[i]) for i in seq}


# ------------------------------------------------------------ recommendations
def test_history_excluded_k_respected_scores_sorted(central):
    for user in range(central.data.num_users):
        recs = central.recommend(user, k=7)["recommendations"]
        assert len(recs) == 7 and [r["rank"] for r in recs] == list(range(1, 8))
        scores = [r["score"] for r in recs]
        assert scores == sorted(scores, reverse=True)
        assert not {r["item"] for r in recs} & _history(central, user)
    unseen = central.data.num_items - len(_history(central, 0))
    assert len(central.recommend(0, k=10_000)["recommendations"]) == unseen  # K capped at the unseen items


def test_history_shown_most_recent_first(central):
    result = central.recommend(3, k=2, history=4)
    last = central.data.sequence(3)[-4:][::-1]
    assert [h["item"] for h in result["history"]] == [str(central.data.item_raw_ids[i]) for i in last]
    assert result["history"][0]["title"].startswith("Movie number")


def test_explain_router_weights_and_memory_items(central):
    result = central.recommend(2, k=5, explain=True)
    assert "saved with the checkpoint" in result["memory"]["source"] and result["memory"]["entries"] > 0
    training = _history(central, 2, "train")
    for rec in result["recommendations"]:
        assert sum(rec["router"].values()) == pytest.approx(1.0, abs=1e-3)
        assert rec["router"]["visual"] == 0 and rec["visual_unused"] == "this item has no image"  # text only
        read = rec["semantic_read"]
        assert read and {m["item"] for m in read} <= training
        weights = [m["attention"] for m in read]
        assert weights == sorted(weights, reverse=True) and all(0 < w <= 1 for w in weights)


def test_federated_checkpoint_rebuilds_memory_like_a_client(trained, federated):
    """No memories in a federated checkpoint: rebuilt with refresh_memory, exactly what a client does."""
    from feddmmr_flower.client import ClientRuntime

    user = 5
    result = federated.recommend(user, k=5, explain=True)
    assert "rebuilt" in result["memory"]["source"] and "stay on the clients" in result["memory"]["source"]
    training = _history(federated, user, "train")
    for rec in result["recommendations"]:
        assert sum(rec["router"].values()) == pytest.approx(1.0, abs=1e-3)
        assert rec["semantic_read"] and {m["item"] for m in rec["semantic_read"]} <= training
    runtime = ClientRuntime(federated.run.cfg)
    arrays = {k: v.numpy() for k, v in federated.run.checkpoint.state_dict.items()}
    client_memory = runtime.evaluate(user, arrays, None, None, split="valid").memory
    memory, row, _ = federated.memory(user)
    assert np.array_equal(memory.item[row].numpy(), client_memory["item"])


def test_attention_weights_are_what_the_expert_reads():
    """The explanation's weights reproduce the expert's output (one head: no averaging over heads)."""
    from feddmmr_flower.models.experts import MemoryExpert

    torch.manual_seed(0)
    expert = MemoryExpert(hidden=8, heads=1, scale=10.0)
    queries, slots = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    visible = torch.rand(2, 3, 5) > 0.3
    weights = expert.attention(queries, slots, visible)
    assert torch.allclose(weights.sum(-1), visible.any(-1).float())
    assert torch.allclose(
        torch.einsum("bqs,bsd->bqd", weights, expert.value(slots)), expert(queries, slots, visible), atol=1e-6
    )


def test_user_ids_are_raw_ids_mapped_to_indices():
    data = distinct_item_data(num_users=6)
    assert user_index(data, "u3") == 3 and user_index(data, " u0 ") == 0
    with pytest.raises(UnknownUserError, match="'u9' is not in this dataset"):
        user_index(data, "u9")


# ------------------------------------------------------------------------ CLI
def test_cli_text_and_json(trained):
    run = str(trained["central"])
    text = run_feddmmr(["feddmmr", "recommend", "--run", run, "--user", "5", "-k", "3", "--explain"], trained["root"])
    assert text.returncode == 0, text.stderr
    assert "user 5 (index 4 = Flower partition-id)" in text.stdout
    assert "top 3 recommendations" in text.stdout and "router: visual 0.00, semantic 1.00" in text.stdout
    as_json = run_feddmmr(
        ["feddmmr", "recommend", "--run", run, "--user-index", "4", "-k", "3", "--json"], trained["root"]
    )
    payload = json.loads(as_json.stdout)
    assert payload["user"] == {"raw_id": "5", "index": 4, "num_items_seen": 25}
    for rec in payload["recommendations"]:  # the same list, in both forms
        assert re.search(rf"{rec['rank']}\.\s+{rec['score']:.3f}  {re.escape(rec['title'])}", text.stdout)


def test_cli_checkpoint_choices(trained):
    by_path = run_feddmmr(
        ["feddmmr", "recommend", "--checkpoint", str(trained["fed"] / "best.pt"), "--user", "1", "--json"],
        trained["root"],
    )
    assert by_path.returncode == 0, by_path.stderr
    assert json.loads(by_path.stdout)["weights"] == "best.pt (federated, round 6 [finetune])"


def _error(trained, *args) -> str:
    done = run_feddmmr(["feddmmr", "recommend", *args], trained["root"])
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("feddmmr: error: "), done.stderr
    return lines[0]


def test_cli_errors_are_one_line(trained):
    run = str(trained["central"])
    assert "user '999' is not in this dataset (20 users" in _error(trained, "--run", run, "--user", "999")
    assert "run folder" in _error(trained, "--run", str(trained["root"] / "nope"), "--user", "1")
    assert "(the folder has best.pt)" in _error(trained, "--run", run, "--checkpoint", "finetune", "--user", "1")
    assert "--user RAW_ID" in _error(trained, "--run", run)
    assert "out of range" in _error(trained, "--run", run, "--user-index", "20")
    other = synthetic_ml100k(trained["root"] / "other-ml-100k", items=60)
    message = _error(trained, "--run", run, "--user", "1", "--data-dir", str(other))
    assert "dataset mismatch" in message and "80 items" in message


def test_not_a_checkpoint(trained):
    junk = trained["root"] / "junk"
    junk.mkdir(exist_ok=True)
    (junk / "best.pt").write_bytes(b"not a checkpoint")
    assert "is not a FedDMMR checkpoint" in _error(trained, "--run", str(junk), "--user", "1")


def test_a_checkpoint_of_another_format_version_is_refused(trained):
    """Old files are refused with their version named, never half-read (resume-from, init-from too)."""
    payload = torch.load(trained["central"] / "best.pt", map_location="cpu", weights_only=False)
    older = trained["root"] / "older"
    older.mkdir(exist_ok=True)
    torch.save({**payload, "version": checkpoint.VERSION + 1}, older / "best.pt")
    assert f"format version {checkpoint.VERSION + 1}" in _error(trained, "--run", str(older), "--user", "1")
    unmarked = {k: v for k, v in payload.items() if k not in ("format", "version")}  # before versions existed
    torch.save(unmarked, older / "best.pt")
    assert "no 'feddmmr-checkpoint' format mark" in _error(trained, "--run", str(older), "--user", "1")
    from feddmmr_flower.errors import ConfigError
    from feddmmr_flower.experiment import load_weights

    with pytest.raises(ConfigError, match="init-from: .* format mark"):
        load_weights(Recommender(load_run(trained["central"])).model, older / "best.pt")
