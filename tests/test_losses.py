"""Losses: each trains a head on a tiny batch, and the pieces with a defined behaviour behave so
(straight-through gradients, BiHalf's split, Hadamard centres, HashNet's continuation)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hashing_models.binarize import bi_half, sign_straight_through
from hashing_models.losses import (
    TRAINABLE_METHODS,
    CSQLoss,
    HashNetLoss,
    TripletRankingLoss,
    create_loss,
    label_similarity,
    make_hash_centers,
)
from hashing_models.losses.hadamard import hadamard
from hashing_models.methods import METHODS
from hashing_models.outputs import HashOutputs

pytestmark = pytest.mark.usefixtures("torch_one_thread")


BITS, CLASSES, BATCH, WIDTH = 16, 4, 16, 24
# A stand-in backbone: only what the head factories read.
TOY_BACKBONE = SimpleNamespace(name="toy", num_features=WIDTH, stage_channels=(4, 6, 8))


def _batch(seed: int = 0) -> tuple[object, torch.Tensor]:
    """Features that carry the class (so every method can fit them) and one-hot labels (B, C)."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(BATCH) % CLASSES
    labels = torch.nn.functional.one_hot(classes, CLASSES).float()
    prototypes = torch.randn(CLASSES, WIDTH, generator=generator)
    features = prototypes[classes] + 0.3 * torch.randn(BATCH, WIDTH, generator=generator)  # (B, D)
    return features, labels


def _stage_maps(features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Three small (B, C_s, 3, 3) maps built from the features, for the attention head."""
    maps, start = [], 0
    for channels in TOY_BACKBONE.stage_channels:
        maps.append(features[:, start : start + channels, None, None].expand(-1, -1, 3, 3).contiguous())
        start += channels
    return tuple(maps)


def test_every_trainable_method_has_a_loss():
    assert set(TRAINABLE_METHODS) == {m for m, spec in METHODS.items() if spec.trainable}
    with pytest.raises(ValueError, match="nothing to train"):
        create_loss("lsh", bits=BITS, num_classes=CLASSES)


@pytest.mark.parametrize(("method", "family"), [(m, f) for m in TRAINABLE_METHODS for f in METHODS[m].head_families])
def test_loss_decreases_when_training_the_head(method, family):
    torch.manual_seed(0)
    spec = METHODS[method]
    head = spec.build_head(TOY_BACKBONE, BITS, CLASSES, 0, family)
    loss_fn = create_loss(method, bits=BITS, num_classes=CLASSES)
    features, labels = _batch()
    inputs = _stage_maps(features) if spec.multi_stage else features
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    history = []
    for step in range(40):
        loss = loss_fn(head(inputs), labels, progress=0.0)
        assert torch.isfinite(loss), (method, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert min(history[-5:]) < 0.8 * history[0], (method, history[0], history[-5:])
    head.eval()  # codes without dropout, as they are encoded
    with torch.no_grad():
        signs = torch.where(head(inputs).h > 0, 1.0, -1.0)  # (B, K)
    hamming = (BITS - signs @ signs.T) / 2
    similar = label_similarity(labels).bool() & ~torch.eye(BATCH, dtype=torch.bool)
    assert hamming[similar].mean() < hamming[~label_similarity(labels).bool()].mean() - 2, method


def test_losses_accept_multi_label_vectors():
    features, _ = _batch()
    labels = torch.zeros(BATCH, CLASSES)
    labels[torch.arange(BATCH), torch.arange(BATCH) % CLASSES] = 1
    labels[::3, 0] = 1  # every third image also carries class 0
    for method in TRAINABLE_METHODS:
        spec = METHODS[method]
        head = spec.make_head(TOY_BACKBONE, BITS, CLASSES, 0)
        inputs = _stage_maps(features) if spec.multi_stage else features
        loss = create_loss(method, bits=BITS, num_classes=CLASSES)(head(inputs), labels, 0.0)
        assert torch.isfinite(loss) and loss.ndim == 0, method


def test_label_similarity_means_sharing_a_label():
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]]).float()
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]]).float()
    torch.testing.assert_close(label_similarity(labels), expected)


# --- binarization -------------------------------------------------------------------------------


def test_greedyhash_sign_passes_gradient_straight_through():
    h = torch.tensor([[0.3, -2.0, 0.0, 5.0]], requires_grad=True)
    b = sign_straight_through(h)
    torch.testing.assert_close(b, torch.tensor([[1.0, -1.0, -1.0, 1.0]]))  # zero → −1, as the packing's bit 0
    upstream = torch.tensor([[0.5, -1.0, 2.0, 3.0]])
    (b * upstream).sum().backward()
    torch.testing.assert_close(h.grad, upstream)  # identity backward, even where sign is flat


def test_bi_half_splits_each_bit_at_the_batch_median():
    h = torch.randn(10, 8, requires_grad=True)
    b = bi_half(h, gamma=2.0)
    assert (b.sum(dim=0) == 0).all()  # five +1 and five −1 per bit
    fifth_largest = h.detach().sort(dim=0, descending=True).values[4]  # (8,)
    assert torch.equal(b > 0, h.detach() >= fifth_largest)
    upstream = torch.randn(10, 8)
    (b * upstream).sum().backward()
    torch.testing.assert_close(h.grad, upstream + 2.0 * (h.detach() - b.detach()) / b.numel())


# --- hash centres ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 32, 48, 64, 128, 256])
def test_hadamard_rows_are_orthogonal(bits):
    matrix = hadamard(bits)
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(matrix @ matrix.T, bits * torch.eye(bits))


def test_csq_centres_are_hadamard_rows_then_their_negations():
    centers = make_hash_centers(10, 32)
    assert centers.shape == (10, 32)
    torch.testing.assert_close(centers, hadamard(32)[:10])  # 10 ≤ 32: rows of H, mutually orthogonal
    torch.testing.assert_close(centers @ centers.T, 32 * torch.eye(10))
    centers = make_hash_centers(20, 16)  # 16 < 20 ≤ 32: rows of H, then of −H
    torch.testing.assert_close(centers, torch.cat([hadamard(16), -hadamard(16)])[:20])
    hamming = (16 - centers @ centers.T) / 2
    assert hamming[~torch.eye(20, dtype=torch.bool)].min() >= 8  # at least half the bits apart


def test_csq_centres_are_random_when_classes_exceed_twice_the_bits():
    centers = make_hash_centers(100, 16, seed=3)
    assert centers.shape == (100, 16) and set(centers.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(centers, make_hash_centers(100, 16, seed=3))  # seeded
    assert not torch.equal(centers, make_hash_centers(100, 16, seed=4))
    assert len({tuple(row.tolist()) for row in centers}) == 100  # no two classes share a centre


def test_multi_label_target_is_sign_of_summed_centres():
    loss = CSQLoss(bits=16, num_classes=3)
    labels = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 1.0], [1.0, 1.0, 0]])
    targets = loss.targets(labels)
    torch.testing.assert_close(targets[0], loss.centers[0])
    torch.testing.assert_close(targets[1], loss.centers.sum(0).sign())  # three ±1 never sum to 0
    total = loss.centers[0] + loss.centers[1]
    torch.testing.assert_close(targets[2], torch.where(total == 0, loss.tie_break, total.sign()))
    assert (targets.abs() == 1).all()


# --- schedules and edge cases ------------------------------------------------------------------------


def test_hashnet_continuation_sharpens_tanh():
    loss_fn = HashNetLoss(bits=BITS)
    assert loss_fn.beta(0.0) == 1.0
    assert loss_fn.beta(0.0) < loss_fn.beta(10.0) < loss_fn.beta(50.0) < loss_fn.beta(100.0)
    features, labels = _batch()
    outputs = HashOutputs(h=0.3 * features[:, :BITS], features=features)
    early, late = loss_fn(outputs, labels, progress=0.0), loss_fn(outputs, labels, progress=100.0)
    assert not torch.isclose(early, late)


def test_triplet_loss_is_zero_without_triplets():
    h = torch.randn(4, BITS, requires_grad=True)
    same_class = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), CLASSES).float()
    loss = TripletRankingLoss(BITS)(HashOutputs(h=h, features=h), same_class)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
