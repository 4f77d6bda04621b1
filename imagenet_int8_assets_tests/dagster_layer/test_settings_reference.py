"""docs/CONFIGURATION.md holds exactly the reference the settings' own fields generate."""

from __future__ import annotations

import re

import pytest

from imagenet_int8_assets import settings_reference
from imagenet_int8_assets.resources import ENV, OTHER_VARIABLES, ImagenetInt8Settings


def test_configuration_document_is_generated_from_the_settings():
    document = settings_reference.DOCUMENT.read_text(encoding="utf-8")
    assert document == settings_reference.replace_generated(document, settings_reference.reference()), (
        "docs/CONFIGURATION.md differs from the configuration reference generated from the settings in "
        f"imagenet_int8_assets/resources.py: run `{settings_reference.REGENERATE}` and commit the result "
        "(edit the fields' descriptions, not the table)."
    )


def test_every_setting_and_variable_is_documented():
    document = settings_reference.DOCUMENT.read_text(encoding="utf-8")
    generated = settings_reference.reference()
    for name, field in ImagenetInt8Settings.model_fields.items():
        assert field.description and field.description.strip(), f"the setting {name} has no description"
        row = f"| `{ENV[name]}` | {settings_reference.render_default(field.default)} |"
        assert row in generated and row in document, f"{ENV[name]} (field {name}) is missing from docs/CONFIGURATION.md"
    for variable, _, meaning in OTHER_VARIABLES:
        assert meaning.strip() and f"| `{variable}` |" in document, f"{variable} is missing from docs/CONFIGURATION.md"
    assert ENV["max_partitions_per_run"] in {variable for variable, _, _ in OTHER_VARIABLES}


def test_descriptions_render_in_the_dagster_ui():
    # the UI renders descriptions as Markdown: a placeholder such as <output> outside a code span would
    # be an HTML tag there; a '|' would end the table cell here
    for name, field in ImagenetInt8Settings.model_fields.items():
        prose = re.sub(r"`[^`]*`", "", field.description or "")
        assert not re.search(r"<[A-Za-z]", prose), (name, field.description)
        assert "|" not in prose, (name, field.description)


def test_a_stale_document_is_noticed(tmp_path):
    document = settings_reference.DOCUMENT.read_text(encoding="utf-8")
    stale = tmp_path / "CONFIGURATION.md"
    stale.write_text(document.replace("| `IMAGENET_INT8_SEED` |", "| `IMAGENET_INT8_SEEDS` |"), encoding="utf-8")
    assert settings_reference.main([str(stale), "--check"]) == 1
    assert settings_reference.main([str(stale)]) == 0  # rewrites it
    assert stale.read_text(encoding="utf-8") == settings_reference.replace_generated(document, settings_reference.reference())
    assert settings_reference.main([str(stale), "--check"]) == 0
    hand_written = tmp_path / "no-markers.md"
    hand_written.write_text("# Configuration\n", encoding="utf-8")
    with pytest.raises(ValueError, match="marker"):
        settings_reference.main([str(hand_written)])
