"""Classic hashing baselines: code shape and packing, determinism, retrieval quality on synthetic clusters."""
from __future__ import annotations

import numpy as np
import pytest

from hashing_models.baselines import BASELINES, ITQ, make_baseline
from hashing_models.codes import pack_signs
from hashing_models.evaluate import evaluate_retrieval


def _clusters(n: int, seed: int, n_clusters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """n points (n, 128) around 10 centres in a 16-dim subspace, with their cluster ids."""
    structure = np.random.default_rng(0)  # the same centres and embedding for every call
    centres, embed = structure.standard_normal((n_clusters, 16)), structure.standard_normal((16, 128)) / 4
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, n_clusters, n)
    latent = centres[cluster] + 0.6 * rng.standard_normal((n, 16))
    return latent @ embed + 0.1 * rng.standard_normal((n, 128)), cluster


@pytest.fixture(scope="module")
def clustered():
    return _clusters(2000, seed=1), _clusters(300, seed=2)


def _map(model, train, query) -> float:
    (x_db, y_db), (x_q, y_q) = train, query
    return evaluate_retrieval(model.encode(x_q), y_q, model.encode(x_db), y_db).map


def _fit(name, bits, x, y, seed=0):
    kwargs = {"anchors": 300} if name == "sdh" else {}
    return make_baseline(name, bits, seed=seed, **kwargs).fit(x, y)


@pytest.mark.parametrize("name", BASELINES)
def test_codes_are_packed_signs_and_deterministic(name, clustered):
    (x, y), (x_q, _) = clustered
    model = _fit(name, 32, x, y)
    codes = model.encode(x_q)
    assert codes.shape == (300, 4) and codes.dtype == np.uint8
    np.testing.assert_array_equal(codes, pack_signs(model.project(x_q)))
    np.testing.assert_array_equal(codes, _fit(name, 32, x, y).encode(x_q))
    bits_used = np.unpackbits(codes, axis=1).mean(axis=0)
    assert np.all((bits_used > 0) & (bits_used < 1)) or name == "sh"  # SH's high modes may be constant


@pytest.mark.parametrize("bits", [16, 32])
def test_itq_beats_lsh_on_clustered_data(bits, clustered):
    train, query = clustered
    itq, lsh = (_map(_fit(name, bits, *train), train, query) for name in ("itq", "lsh"))
    assert itq > lsh + 0.1, (itq, lsh)
    assert itq > 0.85


def test_every_baseline_beats_chance(clustered):
    # 16 bits: the data spans 16 dims, and PCAH's further directions are noise.
    train, query = clustered
    for name in BASELINES:
        assert _map(_fit(name, 16, *train), train, query) > 0.3, name  # chance ≈ 0.1


def test_sdh_uses_labels(clustered):
    # Classes made of two distant clusters each: invisible to unsupervised methods, learnt by SDH.
    (x, cluster), (x_q, cluster_q) = clustered
    train, query = (x, cluster % 5), (x_q, cluster_q % 5)
    sdh, itq = _map(_fit("sdh", 32, *train), train, query), _map(_fit("itq", 32, *train), train, query)
    assert sdh > 0.9 and sdh > itq + 0.2, (sdh, itq)


def test_itq_rotation_lowers_quantisation_loss(clustered):
    (x, _), _ = clustered

    def loss(model):
        v = model.project(x)
        return np.square(np.where(v > 0, 1.0, -1.0) - v / np.abs(v).mean()).sum()

    random_rotation, learnt = ITQ(32, iterations=0).fit(x), ITQ(32).fit(x)
    assert loss(learnt) < loss(random_rotation)
    np.testing.assert_allclose(learnt.projection_.T @ learnt.projection_, np.eye(32), atol=1e-9)


def test_seed_changes_random_methods(clustered):
    (x, y), (x_q, _) = clustered
    for name in ("lsh", "itq", "sdh"):
        assert not np.array_equal(_fit(name, 16, x, y, seed=0).encode(x_q), _fit(name, 16, x, y, seed=1).encode(x_q))


def test_spectral_hashing_allows_more_bits_than_dims():
    x = np.random.default_rng(0).standard_normal((500, 4))
    assert make_baseline("sh", 16).fit(x).encode(x).shape == (500, 2)


def test_bad_inputs_are_named(clustered):
    (x, y), _ = clustered
    with pytest.raises(ValueError, match="only 128 dims"):
        make_baseline("itq", 256).fit(x)
    with pytest.raises(ValueError, match="supervised: fit needs labels"):
        make_baseline("sdh", 16).fit(x)
    with pytest.raises(RuntimeError, match="call fit"):
        make_baseline("lsh", 16).encode(x)
    with pytest.raises(ValueError, match="fitted on 128-dim features, got 3-dim"):
        make_baseline("lsh", 16).fit(x).encode(x[:, :3])
    with pytest.raises(ValueError, match="multiple of 8"):
        make_baseline("lsh", 12)
    with pytest.raises(ValueError, match="unknown baseline 'kmh'"):
        make_baseline("kmh", 16)
    with pytest.raises(ValueError, match="NaN"):
        make_baseline("lsh", 16).fit(np.full((3, 2), np.nan))
