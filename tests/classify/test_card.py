"""The model card: failure modes found from fabricated metrics (exact), and a card of a real run."""

from __future__ import annotations

from melanogan.classify.card import failure_modes


def _m(auc, ci, sens=0.8, spec=0.8, subgroups=()):
    return {"roc_auc": auc, "roc_auc_ci95": ci, "by_subgroup": list(subgroups),
            "thresholds": {"val_youden": {"threshold": 0.3, "sensitivity": sens, "specificity": spec}}}


def test_failure_modes_are_found_from_the_numbers():
    low = {"variable": "ita_category", "value": "brown", "n_images": 40, "n_melanoma": 8, "roc_auc": 0.6,
           "roc_auc_ci95": [0.5, 0.7], "note": ""}
    fine = {"variable": "sex", "value": "male", "n_images": 90, "n_melanoma": 20, "roc_auc": 0.82,
            "roc_auc_ci95": [0.7, 0.9], "note": ""}
    tiny = {"variable": "ita_category", "value": "dark", "n_images": 3, "n_melanoma": 1, "roc_auc": None,
            "roc_auc_ci95": [None, None], "note": "too few for an AUC"}
    internal = _m(0.85, [0.8, 0.9], subgroups=[low, fine, tiny])

    def dx(name, auc, ci, called=0.2, melanoma=False):
        return {"diagnosis": name, "melanoma": melanoma, "n_images": 30, "called_melanoma": called,
                "roc_auc_vs_melanoma": auc, "roc_auc_vs_melanoma_ci95": ci}

    # keratoses: CI wholly below the overall 0.85; naevi: the CI reaches it (0.86); too few: no CI
    internal["by_diagnosis"] = [dx("melanoma", None, None, 0.8, True),
                                dx("seborrheic keratosis", 0.62, [0.5, 0.74], 0.47),
                                dx("nevus", 0.8, [0.74, 0.86]), dx("dermatofibroma", None, [None, None])]
    found = failure_modes(internal, {"eval-external-derm7pt": _m(0.65, [0.55, 0.75], sens=0.95, spec=0.4),
                                     "eval-test-tta8": _m(0.86, [0.81, 0.91])})
    assert found[0].startswith("Subgroup ita_category = brown (40 images, 8 melanoma): ROC-AUC 0.600 [0.500, 0.700]")
    assert found[1] == ("Diagnosis seborrheic keratosis (30 images): the melanomas are told from it at ROC-AUC 0.620 "
                        "[0.500, 0.740], wholly below the overall 0.850; 0.470 of them called melanoma at the "
                        "validation threshold.")
    assert "Not assessable (too few images of a class for an AUC): ita_category = dark." in found[2]
    assert found[3].startswith("eval-external-derm7pt: ROC-AUC 0.650 [0.550, 0.750], wholly below")
    assert "specificity is 0.400 against 0.800 internally" in found[4]
    assert len(found) == 5  # the male subgroup, the naevi, the sensitivity gain and the TTA evaluation: no failures
    assert failure_modes(None, {}) == []


def test_card_of_a_trained_and_evaluated_run(demo_prepared, tmp_path):
    from melanogan.classify.card import write_card
    from melanogan.classify.evaluate import evaluate_run
    from melanogan.classify.train import TrainConfig, train_classifier

    run = tmp_path / "run"
    train_classifier(demo_prepared, run, TrainConfig(image_size=32, epochs=1, batch_size=8, workers=0), progress=False)
    r = evaluate_run(run, bootstrap=20)
    md, html = write_card(run)
    text = md.read_text()
    lo, hi = r["roc_auc_ci95"]
    assert f"| eval-test | {r['n_images']} | {r['n_melanoma']} | {r['roc_auc']:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    for heading in ("Intended use", "Training data", "Preprocessing", "Subgroups (internal test)",
                    "Known failure modes", "Synthetic data", "Reporting items covered"):
        assert f"## {heading}" in text
    for d in r["by_diagnosis"]:  # every diagnosis of the internal test, with its share called melanoma
        assert f"| {d['diagnosis']} | {d['group']} | {'yes' if d['melanoma'] else 'no'} | {d['n_images']} | " \
               f"{d['called_melanoma']:.3f} |" in text
    assert "TRIPOD+AI" in text and "<table>" in html.read_text()


def test_the_card_names_the_hair_mask_a_run_was_trained_with():
    from melanogan.classify.card import _hair

    recorded = {"size": 256, "resize_mode": "crop", "color_constancy": True, "max_pixels": 100_000_000}
    assert _hair({**recorded, "hair_removal": False}) == "off"
    # a run from before --hair-method recorded none: it was trained with the black-hat mask
    assert _hair({**recorded, "hair_removal": True}) == "on (every thin dark structure, pigment network included)"
    assert _hair({**recorded, "hair_removal": True, "hair_method": "lines"}) == "on (long thin lines only)"


def test_the_card_names_exposure_normalisation_only_when_a_run_used_it():
    from melanogan.classify.card import _preprocessing

    recorded = {"size": 256, "resize_mode": "crop", "color_constancy": True, "hair_removal": False}
    tail = ("hair removal off; then resized to 96 px and normalised with ImageNet statistics. `predict`, `serve` "
            "and `export` apply the same steps from run.json.")
    assert _preprocessing(recorded, 96) == f"Decoded once at 256 px (crop), colour constancy on, {tail}"
    assert _preprocessing({**recorded, "white_level": 180}, 96) == \
        f"Decoded once at 256 px (crop), colour constancy on, exposure normalised to grey level 180, {tail}"
    assert _preprocessing({**recorded, "white_level": 180, "clahe": 2.0}, 96) == \
        ("Decoded once at 256 px (crop), colour constancy on, exposure normalised to grey level 180, local "
         f"contrast equalised (CLAHE, clip limit 2), {tail}")
    assert _preprocessing({**recorded, "clahe": 0.0}, 96) == _preprocessing(recorded, 96)
