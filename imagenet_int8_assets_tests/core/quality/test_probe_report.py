"""The probe's report folder (core.quality.probe_report.build_probe_report / ProbeReport.write)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from imagenet_int8_assets.core.quality.probe import KNN, LOGISTIC, build_feature_sets, run_probe
from imagenet_int8_assets.core.quality.probe_report import CHANCE_ROW, build_probe_report, notes_html

NAMES = ["tench", "springer <dog>", "cassette & player"]


@pytest.fixture(scope="module")
def probed():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 8)  # a small training set: KNN's k is capped, a note
    latents = labels[:, None, None, None] + rng.normal(size=(24, 4, 8, 8)).astype(np.float32)
    features = build_feature_sets(latents, None, None, pool=4)
    with threadpool_limits(limits=1):
        result = run_probe(features, labels, NAMES, seed=0, models=[LOGISTIC, KNN])
    return result, features, labels


def test_notes_are_separate_escaped_paragraphs():
    assert notes_html(["a <b>", "c & d"]) == "<p>a &lt;b&gt;</p>\n<p>c &amp; d</p>"
    assert notes_html([]) == "<p>-</p>"


def test_the_report_folder_shows_every_note_and_no_literal_br(probed, tmp_path):
    result, features, labels = probed
    result.notes.append("a note with <markup> & an ampersand")
    assert len(result.notes) >= 2 and any(KNN in note for note in result.notes)
    report = build_probe_report(result, features["sample"], labels, NAMES)
    folder = report.write(tmp_path / "probe" / "report")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["confusion_matrix.png", "pca.png", "feature_density.png", "accuracy.md", "results.json", "report.html"]
    )
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "&lt;br&gt;" not in page and "<br>" not in page
    notes_section = page.split("<h2>Notes</h2>", 1)[1].split("</section>", 1)[0]
    for note in result.notes[:-1]:
        assert f"<p>{note}</p>" in notes_section  # the probe's own notes carry no markup
    assert "<p>a note with &lt;markup&gt; &amp; an ampersand</p>" in notes_section
    assert notes_section.count("<p>") == len(result.notes)
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert results["notes"] == result.notes and results["table"][-1]["model"] == CHANCE_ROW
    assert results["chance"]["accuracy"] == pytest.approx(result.chance["accuracy"])
    assert (folder / "accuracy.md").read_text(encoding="utf-8").startswith("| Model | Accuracy sample |")
    for name in ("confusion_matrix", "pca", "feature_density"):
        with Image.open(folder / f"{name}.png") as img:
            assert img.format == "PNG" and img.width > 100
    assert report.size() == sum(p.stat().st_size for p in folder.iterdir())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_a_report_without_notes_says_so(probed, tmp_path):
    result, features, labels = probed
    result.notes.clear()
    page = build_probe_report(result, features["sample"], labels, NAMES).html
    assert "<h2>Notes</h2>\n<p>-</p>" in page
