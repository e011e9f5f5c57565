"""The translate stage's work (xfer/translate_stage.py): cached by content, published whole, read by fine-tuning."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import REPO
from PIL import Image

from xfer.config import parse_params
from xfer.data.split import read_manifest, rows
from xfer.finetune_job import source_train_rows
from xfer.layout import Layout
from xfer.translate_stage import published_key, stage_paths, translate_stage, translated_rows

TINY = {"enabled": True, "image_size": 16, "channels": 4, "residual_blocks": 1, "epochs": 2, "batch_size": 8, "device": "cpu"}


def project(root, n_source=12, n_target=10) -> Layout:
    """Real PNGs under data/raw and a manifest: light squares (source, 2 classes) and dark ones (unlabelled target)."""
    rng = np.random.default_rng(0)
    records = []
    for domain, role, split, n in (("light", "source", "train", n_source), ("light", "source", "val", 4), ("dark", "target", "unlabeled", n_target)):
        for i in range(n):
            label = i % 2
            pixels = rng.integers(150, 255, (12, 12, 3)) if domain == "light" else rng.integers(0, 100, (12, 12, 3))
            path = f"data/raw/toy/{domain}/{label}/{split}_{i}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(root / path)
            sha = hashlib.sha256((root / path).read_bytes()).hexdigest()
            records.append((path, label, str(label), domain, role, split, sha))
    layout = Layout(root)
    layout.manifest.parent.mkdir(parents=True)
    pd.DataFrame(records, columns=["path", "label", "class_name", "domain", "role", "split", "sha256"]).to_csv(layout.manifest, index=False)
    return layout


def run(layout: Layout, params, **kwargs):
    return translate_stage(**stage_paths(layout), params=params, progress=False, **kwargs)


def params(**translate):
    return parse_params({"translate": TINY | translate, "finetune": {"source_images": "translated"}})


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_stage_translates_every_source_train_image_and_a_second_run_takes_the_cache(tmp_path):
    layout = project(tmp_path)
    epochs = []
    first = run(layout, params(), on_epoch=lambda e, r: epochs.append(e))
    assert not first.cache_hit and epochs == [1, 2]
    manifest = read_manifest(layout.manifest)
    source = rows(manifest, "source", "train")
    translated = translated_rows(layout, source)
    assert len(translated) == len(source) and translated.label.tolist() == source.label.tolist()
    for path in translated.path:
        with Image.open(layout.root / path) as img:
            assert img.size == (16, 16)
    summary = json.loads(layout.metrics("translate").read_text())
    assert summary["epochs"] == 2 and summary["epochs_reused"] == 0 and summary["source_images"] == 12 and summary["target_images"] == 10
    assert set(summary["final"]) == {"generator_adversarial_loss", "cycle_loss", "identity_loss", "discriminator_loss"}
    assert (layout.stage_plots("translate") / "grid.png").stat().st_size > 0
    assert (layout.stage_plots("translate") / "learning_curve.csv").read_text().count("\n") == 3  # header + 2 epochs
    published = files(layout.translated)

    # Same rows, params and seed: taken from the cache, nothing trained, the same bytes; the
    # epochs' losses are still handed on (the stage logs them to MLflow each time).
    replayed = []
    again = run(layout, params(), on_epoch=lambda e, r: replayed.append(e))
    assert again.cache_hit and again.key == first.key and replayed == [1, 2]
    assert files(layout.translated) == published and published_key(layout.translated) == first.key

    # Another seed, or another knob, is another entry; the old one stays in the cache.
    other = run(layout, params(epochs=1))
    assert other.key != first.key and not other.cache_hit
    assert files(layout.translated) != published
    assert (layout.translate_cache / first.key / "meta.json").is_file()


def test_finetune_reads_original_translated_or_both(tmp_path):
    layout = project(tmp_path)
    run(layout, params())
    manifest = read_manifest(layout.manifest)
    original = source_train_rows(layout, manifest, "original")
    translated = source_train_rows(layout, manifest, "translated")
    both = source_train_rows(layout, manifest, "both")
    assert original.path.tolist() == rows(manifest, "source", "train").path.tolist()
    assert all(p.startswith("data/translated/images/") for p in translated.path)
    assert both.path.tolist() == original.path.tolist() + translated.path.tolist()
    assert both.label.tolist() == original.label.tolist() * 2


def test_a_translation_of_other_rows_or_none_is_refused(tmp_path):
    layout = project(tmp_path)
    manifest = read_manifest(layout.manifest)
    with pytest.raises(FileNotFoundError, match="run the translate stage"):
        source_train_rows(layout, manifest, "translated")
    run(layout, params())
    fewer = manifest.drop(index=manifest.index[0])
    with pytest.raises(ValueError, match="other source train rows"):
        source_train_rows(layout, fewer, "both")


def test_no_unlabelled_target_images_is_a_clear_error_before_any_work(tmp_path):
    layout = project(tmp_path, n_target=0)
    with pytest.raises(ValueError, match="has 12 and 0"):
        run(layout, params())
    assert not layout.translated.exists() and not layout.translate_cache.exists()


def test_translated_source_images_need_the_stage_on_and_no_importance_weights():
    with pytest.raises(ValueError, match="set translate.enabled true"):
        parse_params({"finetune": {"source_images": "both"}})
    with pytest.raises(ValueError, match="importance_weighting weighs the original source images"):
        parse_params({"translate": {"enabled": True}, "finetune": {"source_images": "translated", "importance_weighting": True}})
    with pytest.raises(ValueError, match="multiple of 4"):
        parse_params({"translate": {"image_size": 18}})


def test_what_a_killed_entry_write_left_is_removed_by_the_next_run_of_its_key(tmp_path):
    """Before: `.<key>.<random>.tmp` of an entry write killed mid-way stayed in data/translate-cache for ever."""
    layout = project(tmp_path)
    key = run(layout, params(epochs=1)).key
    shutil.rmtree(layout.translate_cache / key)  # as if the run had been killed while writing its entry
    code = "import os, signal, sys\nfrom xfer.io import atomic_dir\nwith atomic_dir(sys.argv[1]) as tmp:\n    (tmp / 'meta.json').write_text('{')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([sys.executable, "-c", code, str(layout.translate_cache / key)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9 and len(list(layout.translate_cache.glob(f".{key}.*.tmp"))) == 1

    again = run(layout, params(epochs=1))

    assert again.key == key and not again.cache_hit
    assert list(layout.translate_cache.glob(f".{key}.*")) == [] and (layout.translate_cache / key / "meta.json").is_file()
