"""The evaluation protocol (DESIGN §5): tie rule, metrics, candidates, full ranking, evaluate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from feddmmr_flower.data import SequenceData
from feddmmr_flower.evaluation import (
    KS,
    TIE_RULE,
    EvalResult,
    all_candidates,
    evaluate,
    metrics_from_ranks,
    rank_of_first,
    sample_candidates,
)


def make_data(sequences: list[list[int]], num_items: int) -> SequenceData:
    items = np.concatenate(sequences).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    names = np.array([""] + [str(i) for i in range(1, num_items + 1)])
    return SequenceData(
        items=items,
        timestamps=np.arange(len(items), dtype=np.int64),
        offsets=offsets,
        user_raw_ids=np.array([f"u{u}" for u in range(len(sequences))]),
        item_raw_ids=names,
        item_titles=names,
        item_genres=np.full(num_items + 1, ""),
    )


@pytest.fixture(scope="module")
def random_data() -> SequenceData:
    """40 users with 5..60 distinct items out of 300."""
    rng = np.random.default_rng(123)
    sequences = [rng.choice(np.arange(1, 301), size=rng.integers(5, 61), replace=False).tolist() for _ in range(40)]
    return make_data(sequences, 300)


@pytest.fixture
def tiny() -> SequenceData:
    """10 items; user 0 = [1, 2, 3, 4, 5], user 1 = [6, 7, 8]."""
    return make_data([[1, 2, 3, 4, 5], [6, 7, 8]], 10)


def minus_id_scorer(users, inputs, candidates):
    """score = -item_id (padding 0 would be the best item: it must never count)."""
    if candidates is None:
        return -torch.arange(11, dtype=torch.float32).expand(len(users), -1)
    return -candidates.float()


# ====================================================================== tie rule + metrics
def test_rank_average_tie_rule():
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.5, 0.5]])
    assert rank_of_first(scores).tolist() == [3.0]  # 1 + 1 higher + 0.5 * 2 ties
    assert TIE_RULE == "average"


def test_rank_all_equal_is_the_expected_rank():
    assert rank_of_first(torch.zeros(2, 101)).tolist() == [51.0, 51.0]  # (101 + 1) / 2
    assert rank_of_first(torch.ones(1, 4)).tolist() == [2.5]


def test_rank_best_worst_and_valid_mask():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 5.0, 1.0, 5.0]])
    assert rank_of_first(scores).tolist() == [1.0, 4.0, 3.5]
    valid = torch.tensor([[True, True, True, True], [True, False, True, False], [True, False, True, False]])
    assert rank_of_first(scores, valid).tolist() == [1.0, 2.0, 1.5]  # column 0 always counts as the target


def test_rank_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        rank_of_first(torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        rank_of_first(torch.tensor([[1.0, float("nan"), 0.0]]))
    # NaN in a column that is not a candidate is irrelevant
    valid = torch.tensor([[True, False, True]])
    assert rank_of_first(torch.tensor([[1.0, float("nan"), 0.0]]), valid).tolist() == [1.0]


def test_metrics_hand_computed():
    ranks = np.array([1.0, 3.0, 7.5, 25.0])
    m = metrics_from_ranks(ranks)
    assert set(m) == {f"{name}@{k}" for k in KS for name in ("HR", "NDCG")} | {"MRR"}
    assert m["HR@5"] == pytest.approx(2 / 4)
    assert m["HR@10"] == pytest.approx(3 / 4)
    assert m["HR@20"] == pytest.approx(3 / 4)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)  # = 0.375
    assert m["NDCG@5"] == pytest.approx(0.375)
    assert m["NDCG@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(8.5)) / 4)
    assert m["NDCG@20"] == pytest.approx(m["NDCG@10"])
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 7.5 + 1 / 25) / 4)
    # boundary: rank exactly k is a hit, k + 0.5 is not
    edge = metrics_from_ranks(np.array([5.0, 5.5]), ks=(5,))
    assert edge == pytest.approx({"HR@5": 0.5, "NDCG@5": 1 / math.log2(6) / 2, "MRR": (1 / 5 + 1 / 5.5) / 2})
    assert metrics_from_ranks(np.array([])) == {}
    assert metrics_from_ranks(torch.ones(3)) == pytest.approx(
        {**{f"HR@{k}": 1.0 for k in KS}, **{f"NDCG@{k}": 1.0 for k in KS}, "MRR": 1.0}
    )


# ====================================================================== sampled candidates
def test_candidates_structure(random_data):
    data = random_data
    users = np.arange(data.num_users)
    for split in ("valid", "test"):
        cand = sample_candidates(data, users, split, num_negatives=100, seed=0)
        assert cand.shape == (data.num_users, 101) and cand.dtype == np.int64
        np.testing.assert_array_equal(cand[:, 0], data.target(users, split))
        negatives = cand[:, 1:]
        assert negatives.min() >= 1 and negatives.max() <= data.num_items  # real ids only, never padding
        history = data.history_mask(users, "all")
        for u in users:
            assert len(set(negatives[u].tolist())) == 100
            assert not history[u, negatives[u]].any()  # never interacted, held-out items included
            seq = set(data.sequence(u).tolist())
            assert seq.isdisjoint(negatives[u].tolist())


def test_candidates_are_reproducible_and_batch_independent(random_data):
    data = random_data
    everyone = sample_candidates(data, np.arange(data.num_users), "test", seed=7)
    again = sample_candidates(data, np.arange(data.num_users), "test", seed=7)
    np.testing.assert_array_equal(everyone, again)
    for batch in ([5], [31, 5, 2], [5, 5]):
        part = sample_candidates(data, np.array(batch), "test", seed=7)
        np.testing.assert_array_equal(part, everyone[batch])
    np.testing.assert_array_equal(all_candidates(data, "test", 100, 7)[("test", 100, 7)], everyone)


def test_candidates_differ_by_split_and_seed(random_data):
    data = random_data
    users = np.arange(data.num_users)
    valid = sample_candidates(data, users, "valid", seed=0)[:, 1:]
    test = sample_candidates(data, users, "test", seed=0)[:, 1:]
    other_seed = sample_candidates(data, users, "test", seed=1)[:, 1:]
    assert all(set(valid[u]) != set(test[u]) for u in users)
    assert all(set(other_seed[u]) != set(test[u]) for u in users)


def test_candidates_are_uniform():
    """Over many seeds every never-interacted item is drawn about equally often."""
    data = make_data([[1, 2, 3, 4, 5]], 150)  # 145 available items, 100 drawn each time
    counts = np.zeros(151)
    for seed in range(300):
        np.add.at(counts, sample_candidates(data, np.array([0]), "test", seed=seed)[0, 1:], 1)
    assert counts[:6].sum() == 0
    expected = 300 * 100 / 145  # ~207; the binomial sd is ~8
    assert counts[6:].min() > expected - 45 and counts[6:].max() < expected + 45


def test_too_few_never_interacted_items():
    data = make_data([[1, 2, 3], list(range(1, 9))], 10)  # user 1 has only items 9, 10 left
    with pytest.raises(ValueError, match=r"user 1 has only 2 never-interacted items, fewer than num_negatives=3"):
        sample_candidates(data, np.array([0, 1]), "test", num_negatives=3)
    cand = sample_candidates(data, np.array([1]), "test", num_negatives=2)  # exactly enough
    assert sorted(cand[0, 1:].tolist()) == [9, 10]


# ====================================================================== full ranking
def test_full_ranking_excludes_history_but_keeps_target(tiny):
    """History items get the top scores: only the target among them may count."""

    def history_first(users, inputs, candidates):
        assert candidates is None
        scores = torch.rand(len(users), 11, generator=torch.Generator().manual_seed(0))  # non-history < 1
        history = torch.as_tensor(tiny.history_mask(users, "all"))
        scores[history] = 10.0  # every history item (target included) and padding tie at the top
        return scores

    for split in ("valid", "test"):
        result = evaluate(tiny, history_first, split, maxlen=4, protocols=("full",))
        assert result.ranks["full"].tolist() == [1.0, 1.0]


def test_full_ranking_counts_every_non_history_item(tiny):
    def target_last(users, inputs, candidates):
        return torch.ones(len(users), 11) + torch.as_tensor(tiny.history_mask(users, "all")).float() * -5

    # the target scores below all 5 (user 0) / 7 (user 1) never-interacted items
    result = evaluate(tiny, target_last, "test", maxlen=4, protocols=("full",))
    assert result.ranks["full"].tolist() == [6.0, 8.0]


# ====================================================================== evaluate
def test_evaluate_minus_id_hand_computed(tiny):
    """score = -item_id: an item beats the target iff its id is smaller."""
    full_test = evaluate(tiny, minus_id_scorer, "test", maxlen=4, protocols=("full",))
    # user 0: target 5, candidates 6..10 all worse -> 1; user 1: target 8, items 1..5 better, 9, 10 worse -> 6
    assert full_test.ranks["full"].tolist() == [1.0, 6.0]
    full_valid = evaluate(tiny, minus_id_scorer, "valid", maxlen=4, protocols=("full",))
    # user 0: target 4 vs 6..10 -> 1; user 1: target 7 vs 1..5, 9, 10 (6 and 8 are history) -> 6
    assert full_valid.ranks["full"].tolist() == [1.0, 6.0]
    assert full_test.metrics("full") == pytest.approx(
        {
            "HR@5": 0.5,
            "HR@10": 1.0,
            "HR@20": 1.0,
            "NDCG@5": 0.5,
            "NDCG@10": (1 + 1 / math.log2(7)) / 2,
            "NDCG@20": (1 + 1 / math.log2(7)) / 2,
            "MRR": (1 + 1 / 6) / 2,
        }
    )

    # sampled with all 5 never-interacted items of user 0: deterministic
    res = evaluate(
        tiny, minus_id_scorer, "test", maxlen=4, users=np.array([0]), num_negatives=5, protocols=("sampled",)
    )
    assert res.ranks["sampled"].tolist() == [1.0]
    # user 1 draws 5 of {1, 2, 3, 4, 5, 9, 10}: rank = 1 + number of drawn ids below 8
    res = evaluate(tiny, minus_id_scorer, "test", maxlen=4, num_negatives=5)
    cand = sample_candidates(tiny, np.array([1]), "test", num_negatives=5)[0]
    assert res.ranks["sampled"].tolist() == [1.0, 1.0 + float((cand[1:] < 8).sum())]
    assert res.ranks["full"].tolist() == [1.0, 6.0]
    assert set(res.summary()) == {"sampled", "full"}


def test_evaluate_passes_the_right_inputs_and_candidates(random_data):
    seen = {}

    def recording(users, inputs, candidates):
        seen.setdefault("inputs", []).append(inputs.numpy())
        if candidates is not None:
            seen.setdefault("cand", []).append(candidates.numpy())
            return torch.zeros(candidates.shape)
        return torch.zeros(len(users), random_data.num_items + 1)

    users = np.array([3, 1, 4, 1, 5])
    evaluate(random_data, recording, "valid", maxlen=6, users=users, batch_size=2, seed=3, protocols=("sampled",))
    np.testing.assert_array_equal(np.concatenate(seen["cand"]), sample_candidates(random_data, users, "valid", seed=3))
    seen.clear()
    # both protocols: one scoring pass over the catalogue per batch serves both
    result = evaluate(random_data, recording, "valid", maxlen=6, users=users, batch_size=2, seed=3)
    np.testing.assert_array_equal(result.users, users)
    assert "cand" not in seen and len(seen["inputs"]) == 3
    inputs = np.concatenate(seen["inputs"])
    np.testing.assert_array_equal(inputs, random_data.input_window(users, "valid", 6))
    # all-zero scores: expected rank under the average tie rule
    assert result.ranks["sampled"].tolist() == [51.0] * 5
    available = (~random_data.history_mask(users, "all")).sum(axis=1)
    np.testing.assert_array_equal(result.ranks["full"], 1 + available / 2)


def test_evaluate_independent_of_batching_and_cache(random_data):
    def scorer(users, inputs, candidates):
        table = torch.as_tensor(np.random.default_rng(0).random(random_data.num_items + 1), dtype=torch.float32)
        table = table + torch.as_tensor(users, dtype=torch.float32)[:, None] * 0.01
        return table.expand(len(users), -1).gather(1, candidates) if candidates is not None else table

    one = evaluate(random_data, scorer, "test", maxlen=8, batch_size=1)
    big = evaluate(random_data, scorer, "test", maxlen=8, batch_size=256)
    cached = evaluate(
        random_data, scorer, "test", maxlen=8, batch_size=7, candidates_cache=all_candidates(random_data, "test")
    )
    for protocol in ("sampled", "full"):
        np.testing.assert_array_equal(one.ranks[protocol], big.ranks[protocol])
        np.testing.assert_array_equal(one.ranks[protocol], cached.ranks[protocol])
    subset = evaluate(random_data, scorer, "test", maxlen=8, users=np.array([9, 2]))
    np.testing.assert_array_equal(subset.ranks["sampled"], big.ranks["sampled"][[9, 2]])


def test_evaluate_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match="'valid' or 'test'"):
        evaluate(tiny, minus_id_scorer, "train", maxlen=4)
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(tiny, minus_id_scorer, "test", maxlen=4, protocols=("sampled", "popularity"))
    with pytest.raises(IndexError):
        evaluate(tiny, minus_id_scorer, "test", maxlen=4, users=np.array([2]))


def test_by_history_length_buckets():
    # training-history lengths (n - 2): 1, 3, 5, 8
    data = make_data([[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7], list(range(1, 11))], 40)
    result = EvalResult(
        "test", np.arange(4), {"full": np.array([1.0, 2.0, 11.0, 30.0]), "sampled": np.array([1.0, 1.0, 1.0, 1.0])}
    )
    buckets = result.by_history_length(data, edges=(2, 5))
    assert list(buckets) == ["<=2", "3-5", ">5"]
    assert [b["num_users"] for b in buckets.values()] == [1, 2, 1]
    assert buckets["<=2"]["full"]["HR@5"] == 1.0
    assert buckets["3-5"]["full"] == pytest.approx(metrics_from_ranks(np.array([2.0, 11.0])))
    assert buckets[">5"]["full"]["MRR"] == pytest.approx(1 / 30)
    assert buckets[">5"]["sampled"]["HR@5"] == 1.0
    # default edges (50, 150): everyone is short
    default = result.by_history_length(data)
    assert list(default) == ["<=50", "51-150", ">150"]
    assert [b["num_users"] for b in default.values()] == [4, 0, 0]
    assert default["51-150"]["full"] == {}
    # a subset of users is bucketed by its own lengths
    sub = EvalResult("test", np.array([3, 0]), {"full": np.array([1.0, 4.0])})
    assert [b["num_users"] for b in sub.by_history_length(data, edges=(2, 5)).values()] == [1, 0, 1]
    assert sub.by_history_length(data, edges=(2, 5))["<=2"]["full"]["MRR"] == pytest.approx(0.25)
