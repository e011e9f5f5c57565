"""evaluate.cv_folds: stratified folds, what is (never) in them, and the head's figures per fold."""

import numpy as np
import pandas as pd
import pytest

from xfer import features as feats
from xfer.config import LINEAR_PROBE, ConfigError, HeadConfig, parse_params
from xfer.cross_validation import LABELLED_ROWS, cross_validate_head, fold_data, make_folds, stratified_folds
from xfer.metrics import classification_metrics

# (role, split) -> rows; every split a manifest has, the labelled target budget (target train) included.
SIZES = {("source", "train"): 90, ("source", "val"): 30, ("target", "train"): 12, ("target", "unlabeled"): 60, ("target", "val"): 30, ("target", "test"): 45}


def feature_set(seed: int = 0, shift: float = 0.5) -> feats.FeatureSet:
    """Three well separated classes in 16 dimensions; the target shifted a little."""
    rng = np.random.default_rng(seed)
    parts, xs = [], []
    for (role, split), n in SIZES.items():
        y = np.arange(n) % 3
        parts.append(pd.DataFrame({"path": [f"{role}/{split}/{i}.png" for i in range(n)], "role": role, "split": split, "label": y}))
        xs.append(np.eye(3, 16)[y] * 4 + rng.normal(size=(n, 16)) + (shift if role == "target" else 0.0))
    return feats.FeatureSet(np.concatenate(xs).astype(np.float32), pd.concat(parts, ignore_index=True), {"key": "k"})


def test_stratified_folds_share_out_every_stratum_and_are_seeded():
    strata = np.array(["a"] * 23 + ["b"] * 7 + ["c"] * 11)
    folds = stratified_folds(strata, 5, seed=0)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.sum() == strata.size and sizes.max() - sizes.min() <= 1
    for s in "abc":
        per_fold = np.bincount(folds[strata == s], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (s, per_fold)
    assert (stratified_folds(strata, 5, seed=0) == folds).all()
    assert (stratified_folds(strata, 5, seed=1) != folds).any()


def test_no_target_test_row_nor_any_unlabelled_or_target_val_row_is_in_a_fold():
    fs = feature_set()
    folds = make_folds(fs, 5, seed=0)
    in_folds = fs.index.iloc[folds.rows]
    assert set(zip(in_folds.role, in_folds.split)) == set(LABELLED_ROWS)
    assert len(folds.rows) == sum(SIZES[r] for r in LABELLED_ROWS)
    test_rows = np.flatnonzero(((fs.index.role == "target") & (fs.index.split == "test")).to_numpy())
    assert test_rows.size and not np.isin(test_rows, folds.rows).any()
    # Each fold's training, epoch-choosing and held-out rows are apart; together the labelled rows.
    for held_out in range(folds.k):
        data, rows = fold_data(fs, folds, held_out)
        trained = np.concatenate([data.source_train[0], data.source_val[0], data.target_labeled[0]])
        held = np.asarray(fs.features[rows])
        assert not (held[:, None, :] == trained[None, :, :]).all(-1).any()
        validation = folds.rows[folds.fold == (held_out + 1) % folds.k]
        assert len(data.source_train[1]) + len(data.target_labeled[1]) + len(rows) + len(validation) == len(folds.rows)
        # Unlabelled target rows adapt, as in the head stage; the held-out fold's target rows do not.
        assert len(data.target_train) == SIZES["target", "unlabeled"] + len(data.target_labeled[1])


def test_each_folds_head_is_scored_on_its_held_out_rows_and_the_summary_is_their_mean_and_std():
    fs = feature_set()
    recipe = HeadConfig(**{**LINEAR_PROBE, "epochs": 15, "lr": 0.05})
    cv = cross_validate_head(fs, recipe, 3, 4, seed=0, progress=False)
    assert cv["folds"] == 4 and cv["rows"] == 132 and sum(cv["fold_sizes"]) == 132
    held = [f["held_out"]["accuracy"] for f in cv["per_fold"]]
    # Separable classes: every fold's head gets its held-out rows (nearly) all right.
    assert min(held) >= 0.9
    assert cv["held_out"]["accuracy"]["mean"] == pytest.approx(np.mean(held))
    assert cv["held_out"]["accuracy"]["std"] == pytest.approx(np.std(held, ddof=1))
    assert sum(f["held_out"]["n"] for f in cv["per_fold"]) == 132
    assert all(f["target_test"]["n"] == SIZES["target", "test"] for f in cv["per_fold"])
    # A fold's target test figures are its head's: recomputed here for fold 0.
    from xfer.heads import predict_proba, train_head

    folds = make_folds(fs, 4, seed=0)
    data, _ = fold_data(fs, folds, 0)
    head, _ = train_head(recipe, data, 3, seed=0)
    x, y = fs.select("target", "test")
    expected = classification_metrics(y, predict_proba(head, x, "target").argmax(1), 3)["accuracy"]
    assert cv["per_fold"][0]["target_test"]["accuracy"] == pytest.approx(expected)


def test_a_bad_fold_count_is_refused_with_what_would_be_valid():
    for k in (1, 2, -1):
        with pytest.raises(ConfigError, match="evaluate.cv_folds"):
            parse_params({"evaluate": {"cv_folds": k}})
    assert parse_params({"evaluate": {"cv_folds": 5}}).evaluate.cv_folds == 5
    with pytest.raises(ValueError, match="only 132 labelled training rows"):
        make_folds(feature_set(), 200, seed=0)
    # 121..132 folds: enough rows, but some fold would have no source row to serve as source val.
    with pytest.raises(ValueError, match="only 120 labelled source rows"):
        make_folds(feature_set(), 121, seed=0)
    assert make_folds(feature_set(), 120, seed=0).k == 120


def test_each_fine_tuning_folds_manifest_holds_out_its_fold_and_chooses_the_epoch_on_the_next():
    """finetune.cv: fold i's manifest puts fold i out of every split a stage reads, fold i + 1's source
    rows in source val, the other folds in train; target test, target val and the unlabelled rows keep
    their splits; together the folds hold every labelled training row out exactly once."""
    from xfer.finetune_cv import HELD_OUT, UNUSED, fold_manifest

    fs = feature_set()
    manifest = fs.index.assign(class_name=fs.index.label.astype(str), domain=fs.index.role, sha256="0")
    folds = make_folds(fs, 4, seed=0)
    held_out_once = np.zeros(len(manifest), dtype=int)
    for held_out in range(folds.k):
        fold = fold_manifest(manifest, folds, held_out)
        assert fold.path.tolist() == manifest.path.tolist() and fold.label.tolist() == manifest.label.tolist()
        out = fold.split.to_numpy() == HELD_OUT
        held_out_once += out
        assert (np.flatnonzero(out) == np.sort(folds.rows[folds.fold == held_out])).all()
        validation = folds.rows[folds.fold == (held_out + 1) % folds.k]
        source_val = np.flatnonzero(((fold.role == "source") & (fold.split == "val")).to_numpy())
        assert (source_val == np.sort(validation[manifest.role.to_numpy()[validation] == "source"])).all()
        assert set(fold.split.to_numpy()[validation[manifest.role.to_numpy()[validation] == "target"]]) <= {UNUSED}
        unchanged = ~np.isin(np.arange(len(manifest)), folds.rows)
        assert (fold.split.to_numpy()[unchanged] == manifest.split.to_numpy()[unchanged]).all()
        assert set(fold.split[unchanged]) == {"unlabeled", "val", "test"}
    assert (held_out_once[folds.rows] == 1).all() and held_out_once.sum() == len(folds.rows)


def test_finetune_cv_needs_folds_and_the_original_source_images():
    with pytest.raises(ConfigError, match="set evaluate.cv_folds >= 3"):
        parse_params({"finetune": {"cv": True}})
    with pytest.raises(ConfigError, match="cv cross-validates with the source images as fetched"):
        parse_params({"evaluate": {"cv_folds": 3}, "translate": {"enabled": True}, "finetune": {"cv": True, "source_images": "both"}})
    assert parse_params({"evaluate": {"cv_folds": 3}, "finetune": {"cv": True}}).finetune.cv
