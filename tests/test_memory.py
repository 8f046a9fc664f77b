"""LocalDynamicMemory (DESIGN §3) and client prototypes: writes, eviction, retrieval, state, K-Means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddmmr_flower.experiment import memory_config, prototype_config
from feddmmr_flower.memory import NEVER, STATE_KEYS, LocalDynamicMemory
from feddmmr_flower.models.feddmmr import FedDMMR, FedDMMRConfig
from feddmmr_flower.prototypes import local_prototypes, memory_prototypes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write(memory: LocalDynamicMemory, items, positions, loss, rows=(0,)) -> dict:
    t = lambda x, dt: torch.tensor(x, dtype=dt)  # noqa: E731
    return memory.write(torch.tensor(rows), t(items, torch.int64), t(positions, torch.int64), t(loss, torch.float32))


def valid_items(memory: LocalDynamicMemory, row: int = 0) -> list[int]:
    return sorted(int(i) for i in memory.item[row] if i > 0)


def entry(memory: LocalDynamicMemory, item: int, row: int = 0) -> dict:
    slot = int((memory.item[row] == item).nonzero().flatten()[0])
    return {k: getattr(memory, k)[row, slot].item() for k in ("position", "freq", "last_write", "surprise")}


# ----------------------------------------------------------------------------- writes
def test_capacity_is_never_exceeded_and_items_stay_unique() -> None:
    """Fixed-capacity memory: after many passes of random writes (across 3 users at once) no row
    holds more than ``capacity`` entries, and no item is stored twice in a row."""
    cfg = memory_config(capacity=5, topk=3, surprise_threshold=0.0, max_writes=4)
    memory = LocalDynamicMemory(3, cfg)
    rng = np.random.default_rng(0)
    for _ in range(40):
        items = rng.integers(0, 25, size=(3, 8))
        loss = rng.random((3, 8)) * (items > 0)
        write(memory, items, np.tile(np.arange(8), (3, 1)), loss, rows=(0, 1, 2))
        for row in range(3):
            stored = memory.item[row][memory.item[row] > 0]
            assert len(stored) <= cfg.capacity
            assert len(set(stored.tolist())) == len(stored)
    assert ((memory.item > 0).sum(1) == cfg.capacity).all()  # 40 passes fill every row
    assert (memory.step == 40).all()


def _full_memory() -> LocalDynamicMemory:
    """Capacity 3, items 1, 2, 3 with explicit counters; step 10."""
    memory = LocalDynamicMemory(1, memory_config(capacity=3, topk=3, surprise_threshold=0.5, max_writes=2))
    memory.item[0] = torch.tensor([1, 2, 3])
    memory.position[0] = torch.tensor([4, 1, 2])
    memory.surprise[0] = torch.tensor([2.0, 2.0, 2.0])
    memory.step[0] = 10
    return memory


def test_full_memory_evicts_the_lowest_frequency_entry() -> None:
    """Utility = α·recency + β·log1p(f)/log1p(f+10): with equal recency the least frequent entry
    (item 2, f=1) is evicted for a new item, the others keep their state."""
    memory = _full_memory()
    memory.freq[0] = torch.tensor([5, 1, 5])
    memory.last_write[0] = torch.tensor([10, 10, 10])
    out = write(memory, [[7]], [[6]], [[1.0]])  # surprise = 1 > 0.5
    assert valid_items(memory) == [1, 3, 7]
    assert out == {"writes": 1, "evictions": 1}
    assert entry(memory, 7) == {"position": 6, "freq": 1, "last_write": 11, "surprise": 1.0}
    assert entry(memory, 1)["freq"] == 5 and entry(memory, 3)["position"] == 2


def test_full_memory_evicts_the_stalest_entry() -> None:
    """With equal frequency, recency decides: the entry written longest ago (item 3) goes."""
    memory = _full_memory()
    memory.freq[0] = torch.tensor([2, 2, 2])
    memory.last_write[0] = torch.tensor([9, 10, 3])
    utility = memory.utility(torch.tensor([0]))[0]
    assert int(utility.argmin()) == 2
    write(memory, [[8]], [[5]], [[1.0]])
    assert valid_items(memory) == [1, 2, 8]
    assert memory.counters[0].tolist() == [1, 0, 1, 1]  # writes, rewrites, evictions, passes


def test_rewrite_bumps_frequency_keeps_max_surprise_and_earliest_position() -> None:
    """A re-written item updates its entry in place: frequency + 1, last write = this pass, the
    larger of the two surprises and the earlier of the two source positions."""
    memory = LocalDynamicMemory(1, memory_config(capacity=4, topk=4, surprise_threshold=1.0, max_writes=3))
    write(memory, [[5, 6]], [[6, 2]], [[3.0, 1.0]])  # surprise 1.5 / 0.5: only item 5
    assert valid_items(memory) == [5]
    assert entry(memory, 5) == {"position": 6, "freq": 1, "last_write": 1, "surprise": 1.5}
    write(memory, [[5, 6]], [[3, 8]], [[1.2, 0.8]])  # surprise 1.2 / 0.8
    assert valid_items(memory) == [5]
    assert entry(memory, 5) == {"position": 3, "freq": 2, "last_write": 2, "surprise": 1.5}
    write(memory, [[6, 5]], [[1, 9]], [[0.5, 2.5]])  # surprise 1/3 and 5/3: a later, more surprising copy
    got = entry(memory, 5)
    assert (got["position"], got["freq"], got["last_write"]) == (3, 3, 3)
    assert got["surprise"] == pytest.approx(5 / 3)
    stats = memory.stats()
    assert (stats["memory-writes"], stats["memory-rewrites"], stats["memory-passes"]) == (3, 2, 3)


def test_an_item_twice_in_one_pass_is_written_once() -> None:
    """Two occurrences of the same item in one pass give one entry (frequency 1), not two slots."""
    memory = LocalDynamicMemory(1, memory_config(capacity=4, topk=4, surprise_threshold=0.0, max_writes=4))
    write(memory, [[4, 9, 4]], [[1, 2, 3]], [[1.0, 1.0, 2.0]])
    assert valid_items(memory) == [4, 9]
    assert entry(memory, 4)["freq"] == 1
    assert memory.counters[0, 0] == 2


def test_surprise_threshold_and_write_cap() -> None:
    """Surprise = loss / the row's mean loss over real positions. Items at or below the threshold
    are not written; above it, at most ``max_writes`` (the most surprising) per pass; padding
    (item 0) never is."""
    memory = LocalDynamicMemory(1, memory_config(capacity=10, topk=5, surprise_threshold=1.0, max_writes=3))
    assert write(memory, [[1, 2, 3]], [[1, 2, 3]], [[2.0, 2.0, 2.0]])["writes"] == 0  # all exactly 1.0
    assert valid_items(memory) == []
    # mean over real positions = 1.0 (the padded position's loss is ignored)
    write(memory, [[0, 4, 5, 6, 7, 8, 9]], [[0, 1, 2, 3, 4, 5, 6]], [[50.0, 0.1, 0.2, 1.0, 1.4, 1.5, 1.8]])
    assert valid_items(memory) == [7, 8, 9]  # 1.0 not > 1.0; 1.4, 1.5, 1.8 the top three
    memory = LocalDynamicMemory(1, memory_config(capacity=10, topk=5, surprise_threshold=1.0, max_writes=2))
    write(memory, [[4, 5, 6, 7, 8, 9]], [[1, 2, 3, 4, 5, 6]], [[0.1, 0.2, 0.6, 1.4, 1.5, 2.2]])
    assert valid_items(memory) == [8, 9]  # capped at 2 although 3 are above the threshold


# -------------------------------------------------------------------------- retrieval
def test_retrieve_sorts_by_position_with_empty_slots_last() -> None:
    """Retrieval returns the top-k entries by utility *sorted by source position* so that "slots
    visible before t" is a prefix; empty slots are item 0 with position NEVER, at the end."""
    memory = LocalDynamicMemory(2, memory_config(capacity=6, topk=6))
    memory.item[0, :4] = torch.tensor([11, 12, 13, 14])
    memory.position[0, :4] = torch.tensor([7, 2, 9, 4])
    memory.freq[0, :4] = torch.tensor([1, 1, 9, 1])
    memory.last_write[0, :4] = 0
    items, positions = memory.retrieve(torch.tensor([0, 1]))
    assert items[0].tolist() == [12, 14, 11, 13, 0, 0]
    assert positions[0].tolist() == [2, 4, 7, 9, NEVER, NEVER]
    assert items[1].tolist() == [0] * 6 and (positions[1] == NEVER).all()
    # top-2 by utility (item 13 has the highest frequency, then a tie), still position-sorted
    items, positions = memory.retrieve(torch.tensor([0]), topk=2)
    assert 13 in items[0].tolist() and positions[0].tolist() == sorted(positions[0].tolist())


# ------------------------------------------------------------------------ persistence
def test_state_round_trip_is_bit_exact_and_validated() -> None:
    """A client's memory lives in Flower's context.state as small arrays: the round trip must be
    bit-exact with dtypes preserved, for any row; bad state is refused with ValueError."""
    cfg = memory_config(capacity=6, topk=4, surprise_threshold=0.0, max_writes=4)
    memory = LocalDynamicMemory(3, cfg)
    rng = np.random.default_rng(1)
    for _ in range(5):
        items = rng.integers(0, 20, size=(3, 7))
        write(memory, items, np.tile(np.arange(7), (3, 1)), rng.random((3, 7)) * (items > 0), rows=(0, 1, 2))
    arrays = memory.state_arrays(1)
    assert set(arrays) == set(STATE_KEYS)
    for key in STATE_KEYS:  # native dtypes (int64 ids/counters, float32 surprise), not a float64 blob
        assert arrays[key].dtype == getattr(memory, key).numpy().dtype, key
    assert arrays["item"].dtype == np.int64 and arrays["surprise"].dtype == np.float32
    other = LocalDynamicMemory(2, cfg)
    other.load_state(arrays, row=1)
    single = LocalDynamicMemory.single(cfg, arrays)
    for copy_ in (other.state_arrays(1), single.state_arrays(0)):
        for key in STATE_KEYS:
            assert copy_[key].dtype == arrays[key].dtype, key
            assert np.array_equal(copy_[key], arrays[key]), key
    assert np.array_equal(other.state_arrays(0)["item"], np.zeros(6, np.int64))  # other row untouched
    arrays["item"][0] = -5  # state_arrays returns copies, not views of the memory
    assert memory.item[1, 0] != -5
    with pytest.raises(ValueError, match="lacks"):
        LocalDynamicMemory.single(cfg, {k: v for k, v in memory.state_arrays(0).items() if k != "surprise"})
    bad = memory.state_arrays(0)
    bad["position"] = bad["position"][:3]
    with pytest.raises(ValueError, match="position"):
        LocalDynamicMemory.single(cfg, bad)
    with pytest.raises(ValueError):
        LocalDynamicMemory.single(memory_config(capacity=8, topk=4), memory.state_arrays(0))


def test_stats_counters_and_size() -> None:
    """stats(): per-user means of the number of valid entries and the write/rewrite/eviction/pass counters."""
    memory = LocalDynamicMemory(2, memory_config(capacity=2, topk=2, surprise_threshold=0.0, max_writes=3))
    write(memory, [[1, 2, 3], [4, 0, 0]], [[1, 2, 3], [1, 0, 0]], [[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]], rows=(0, 1))
    # row 0: 3 candidates, capacity 2 -> 3 written, 1 evicted; row 1: one write
    held = valid_items(memory, 0)[0]  # which two of the three survived is a tie: pick one that did
    write(memory, [[held, 0, 0], [4, 5, 0]], [[4, 0, 0], [2, 3, 0]], [[1.0, 0.0, 0.0], [1.0, 3.0, 0.0]], rows=(0, 1))
    # row 0: rewrite of ``held``; row 1: surprises 0.5 and 1.5 (> 0) -> rewrite of 4, new 5 in the free slot
    stats = memory.stats()
    assert stats["memory-size"] == 2.0
    assert stats["memory-passes"] == 4 / 2
    assert stats["memory-writes"] == (3 + 1 + 1 + 2) / 2
    assert stats["memory-rewrites"] == 2 / 2
    assert stats["memory-evictions"] == 1 / 2
    assert memory.stats(torch.tensor([1]))["memory-writes"] == 3


# ------------------------------------------------------------------------- prototypes
def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tight clusters of 5 points and one isolated point, 6-d."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.01, (5, 6)) + 5.0
    b = rng.normal(0.0, 0.01, (5, 6)) - 5.0
    lone = np.full((1, 6), 40.0)
    return np.concatenate([a, lone, b]), np.ones(11)


def test_prototypes_release_only_large_clusters() -> None:
    """A centroid leaves the client only if its cluster has >= min_cluster_size members: the lone
    point must not be released (it would reveal one memory entry). Shapes [k, P] float32."""
    vectors, weights = _clusters()
    centroids, sizes = local_prototypes(
        vectors, weights, prototype_config(num_prototypes=3, min_cluster_size=3, noise_std=0.0)
    )
    assert centroids.shape == (2, 6) and centroids.dtype == np.float32
    assert sizes.dtype == np.float32 and sorted(sizes.tolist()) == [5.0, 5.0]
    means = sorted([vectors[:5].mean(0), vectors[6:].mean(0)], key=lambda m: m[0])
    got = sorted(centroids, key=lambda m: m[0])
    for m, c in zip(means, got):
        np.testing.assert_allclose(c, m, atol=1e-5)
    assert not (np.abs(centroids - 40.0) < 1).all(1).any()


def test_prototypes_are_deterministic_for_a_seed() -> None:
    """Fixed seed: the same memory gives identical prototypes twice (reproducible runs)."""
    rng = np.random.default_rng(3)
    vectors, weights = rng.normal(size=(20, 8)), rng.random(20)
    cfg = prototype_config(num_prototypes=4, min_cluster_size=2, noise_std=0.0, seed=7)
    c1, s1 = local_prototypes(vectors, weights, cfg)
    c2, s2 = local_prototypes(vectors, weights, cfg)
    assert np.array_equal(c1, c2) and np.array_equal(s1, s2) and len(c1) > 0


def test_prototypes_of_a_tiny_memory_are_empty() -> None:
    """Fewer entries than min_cluster_size: nothing can be released, an empty [0, P] array."""
    centroids, sizes = local_prototypes(
        np.ones((2, 6)), np.ones(2), prototype_config(min_cluster_size=3, noise_std=0.0)
    )
    assert centroids.shape == (0, 6) and sizes.shape == (0,)
    assert centroids.dtype == np.float32


def test_prototype_noise() -> None:
    """noise_std > 0 perturbs the released centroids (by about noise_std), noise_std = 0 does not."""
    vectors, weights = _clusters()
    clean, _ = local_prototypes(vectors, weights, prototype_config(num_prototypes=3, noise_std=0.0))
    noisy, sizes = local_prototypes(
        vectors, weights, prototype_config(num_prototypes=3, noise_std=0.5), rng=np.random.default_rng(0)
    )
    assert noisy.shape == clean.shape and sorted(sizes.tolist()) == [5.0, 5.0]
    diff = np.abs(noisy - clean)
    assert diff.max() > 0.05 and diff.mean() < 2.0


def test_memory_prototypes_live_in_the_id_text_image_space() -> None:
    """A client's prototypes are [ID | text | image] vectors (dim hidden + 384 + 512, the layout
    ``FedDMMR.slots`` slices), computed from its memory entries; an empty memory gives [0, P]."""
    torch.manual_seed(0)
    model = FedDMMR(FedDMMRConfig(num_items=30, hidden=16, maxlen=12, num_blocks=1, dropout=0.0))
    rng = np.random.default_rng(0)
    model.set_features(rng.normal(size=(31, 512)), np.ones(31, bool), rng.normal(size=(31, 384)), np.ones(31, bool))
    memory = LocalDynamicMemory(2, memory_config(capacity=12, topk=6, surprise_threshold=0.0, max_writes=12))
    items = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    write(memory, items.tolist(), [list(range(1, 11))], [list(np.linspace(1, 2, 10))])
    cfg = prototype_config(num_prototypes=3, min_cluster_size=2, noise_std=0.0, seed=0)
    centroids, sizes = memory_prototypes(model, memory, 0, cfg)
    assert centroids.shape[1] == 16 + 384 + 512 == model.config.prototype_dim
    assert 1 <= len(centroids) <= 3 and sizes.sum() <= 10 and (sizes >= 2).all()
    # each centroid's text/image parts are means of real item features: inside their bounding box
    txt = model.txt_feat[1:11].numpy()
    assert (centroids[:, 16:400] <= txt.max(0) + 1e-4).all() and (centroids[:, 16:400] >= txt.min(0) - 1e-4).all()
    empty, empty_sizes = memory_prototypes(model, memory, 1, cfg)
    assert empty.shape == (0, model.config.prototype_dim) and empty_sizes.shape == (0,)


def test_a_refused_state_leaves_the_memory_untouched() -> None:
    """A state refused with ValueError must not half-load: the memory keeps its previous content
    (as ``stages.load_arrays`` does for model tensors)."""
    memory = LocalDynamicMemory(1, memory_config(capacity=4, topk=2))
    before = memory.state_arrays(0)
    bad = {k: v.copy() for k, v in before.items()}
    bad["item"] = np.array([1, 2, 3, 4])
    bad["surprise"] = np.zeros(3, np.float32)  # wrong shape, validated after "item"
    with pytest.raises(ValueError, match="surprise"):
        memory.load_state(bad)
    assert np.array_equal(memory.state_arrays(0)["item"], before["item"])


def test_prototype_noise_is_not_the_same_for_every_client() -> None:
    """Privacy noise only protects if the server cannot predict it: two clients releasing
    prototypes through ``memory_prototypes`` with the run's PrototypeConfig must not add the
    identical noise vector."""
    torch.manual_seed(0)
    model = FedDMMR(FedDMMRConfig(num_items=30, hidden=16, maxlen=12, num_blocks=1, dropout=0.0))
    rng = np.random.default_rng(0)
    model.set_features(rng.normal(size=(31, 512)), np.ones(31, bool), rng.normal(size=(31, 384)), np.ones(31, bool))
    memory = LocalDynamicMemory(2, memory_config(capacity=12, topk=6, surprise_threshold=0.0, max_writes=12))
    write(memory, [list(range(1, 7)), list(range(11, 17))], [list(range(1, 7))] * 2, [[1.0, 2.0] * 3] * 2, rows=(0, 1))
    clean_cfg = prototype_config(num_prototypes=1, min_cluster_size=2, noise_std=0.0)
    noisy_cfg = prototype_config(num_prototypes=1, min_cluster_size=2, noise_std=0.1)
    offsets = [
        memory_prototypes(model, memory, row, noisy_cfg)[0] - memory_prototypes(model, memory, row, clean_cfg)[0]
        for row in (0, 1)
    ]
    assert offsets[0].shape == offsets[1].shape == (1, model.config.prototype_dim)
    assert not np.allclose(offsets[0], offsets[1], rtol=0, atol=1e-5)  # atol: float32 rounding of the centroids
