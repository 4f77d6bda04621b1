"""One static partition per class folder found under the source when definitions load."""

from __future__ import annotations

from dagster import StaticPartitionsDefinition

from imagenet_int8_assets.core.sources import list_class_folders
from imagenet_int8_assets.resources import ImagenetInt8Settings


def class_partitions(settings: ImagenetInt8Settings) -> StaticPartitionsDefinition:
    """Partition keys are the class folder names, sorted (= label order for ImageNet wnids).

    Folders that cannot be classes (a name that is not UTF-8 or that Dagster refuses as a key, a
    broken, looping or duplicate link) are left out here and recorded by the manifest
    (``core.sources.find_class_folders``), so loading the definitions never fails on them."""
    return StaticPartitionsDefinition(list_class_folders(settings.source_path()))
