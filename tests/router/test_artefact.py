"""The trained artefact: what is saved is what is loaded, and nothing else loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from services.common.embedding import shared_encoder
from services.router.artefact import TIERS, ArtefactError, TierModel
from tests.router.conftest import TICKETS


def test_a_saved_artefact_loads_with_the_same_probabilities_and_version(
    trained_model: TierModel, tmp_path: Path
) -> None:
    path = tmp_path / "a.npz"
    version = trained_model.save(path)
    loaded = TierModel.load(path)
    vectors = shared_encoder(None, 2).embed_sync(["Where is my parcel?"]).vectors

    assert loaded.version == version
    assert loaded.classes == trained_model.classes
    np.testing.assert_allclose(
        loaded.tier_probabilities(vectors), trained_model.tier_probabilities(vectors), atol=1e-6
    )
    assert loaded.meta["rows"] == len(TICKETS)
    assert loaded.familiar_similarity == trained_model.familiar_similarity
    np.testing.assert_array_equal(
        loaded.unfamiliarity(vectors), trained_model.unfamiliarity(vectors)
    )


def test_unfamiliarity_runs_from_the_familiar_similarity_down_to_the_out_of_domain_bar(
    trained_model: TierModel,
) -> None:
    bar, familiar = trained_model.ood_min_similarity, trained_model.familiar_similarity
    nearest = np.array([familiar + 0.05, familiar, (bar + familiar) / 2, bar, bar - 0.01])

    assert 0 < bar < familiar < 1  # both chosen on the held-out questions
    np.testing.assert_allclose(trained_model.unfamiliarity_at(nearest), [0, 0, 0.5, 1, 1])


def test_a_familiar_similarity_below_the_bar_is_refused(trained_model: TierModel) -> None:
    with pytest.raises(ArtefactError, match="familiar similarity is below"):
        dataclasses.replace(trained_model, familiar_similarity=trained_model.ood_min_similarity / 2)


def test_the_trained_classifier_separates_the_tiers_it_learned(trained_model: TierModel) -> None:
    probabilities = trained_model.tier_probabilities(
        shared_encoder(None, 2)
        .embed_sync(
            [
                "What time does the store open on Saturday?",
                "How do I change the password of my account?",
                "I was charged twice for one order and want the money investigated",
            ]
        )
        .vectors
    )

    assert [TIERS[int(i)] for i in probabilities.argmax(axis=1)] == list(TIERS)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_tampered_artefact_is_refused(trained_model: TierModel, tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    trained_model.save(path)
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["bias"] = arrays["bias"] + 1.0
    np.savez(path, **arrays)

    with pytest.raises(ArtefactError, match="does not match its version"):
        TierModel.load(path)


@pytest.mark.parametrize(
    ("content", "error"),
    [(b"not a zip at all", "not a router artefact"), (None, "no such artefact")],
)
def test_a_file_that_is_not_an_artefact_says_so(
    tmp_path: Path, content: bytes | None, error: str
) -> None:
    path = tmp_path / "bad.npz"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(ArtefactError, match=error):
        TierModel.load(path)


def test_an_array_file_of_another_kind_is_not_an_artefact(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros((2, 3)))

    with pytest.raises(ArtefactError, match="no bias, meta, version"):
        TierModel.load(path)


def test_a_truncated_artefact_is_refused_not_crashed_on(
    trained_model: TierModel, tmp_path: Path
) -> None:
    path = tmp_path / "a.npz"
    trained_model.save(path)
    whole = path.read_bytes()
    for cut in (0, 30, len(whole) // 2, len(whole) - 10):
        path.write_bytes(whole[:cut])
        with pytest.raises(ArtefactError, match="not a router artefact"):
            TierModel.load(path)


def test_probabilities_stay_within_bounds_however_sure_the_model_is() -> None:
    rng = np.random.default_rng(0)
    model = TierModel(
        weights=(rng.standard_normal((40, 16)) * 50).astype(np.float32),
        bias=np.zeros(40, dtype=np.float32),
        classes=tuple(f"c{i}" for i in range(40)),
        class_tiers=tuple(TIERS[i % 3] for i in range(40)),
        temperature=0.3,
        embedding_model="test",
    )
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)

    probabilities = model.tier_probabilities(vectors)

    assert probabilities.max() <= 1.0
    assert probabilities.min() >= 0.0
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
