"""AuraEquiVAE's published weights: strict loading of the safetensors file.

The published weights file ``vae_epoch_3_step_49501_bf16.pt`` is a safetensors file despite its
name: ``load_aura_state_dict`` reads it with ``safetensors`` and loads it strictly, saying what
does not match (missing or unexpected keys, shapes) and what to do.
"""

from __future__ import annotations

from pathlib import Path

from imagenet_int8_assets.core.latents.aura_model import AuraEquiVAE

AURA_REPO_ID = "fal/AuraEquiVAE"
AURA_WEIGHTS_FILE = "vae_epoch_3_step_49501_bf16.pt"


class AuraWeightsError(ValueError):
    """The weights file does not fit the model; the message names the file and what to do."""


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_aura_state_dict(model: AuraEquiVAE, path: str | Path, assign: bool = False) -> AuraEquiVAE:
    """Load a safetensors weights file (whatever its extension, e.g. ``.pt``) strictly into ``model``.

    Values are copied into the model's existing dtype and device (``assign=True`` adopts the file's
    tensors instead, e.g. for a model built on the meta device). Raises ``AuraWeightsError`` when the
    file is missing, is not safetensors, or its keys or shapes do not match the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    advice = (
        f"Use the published {AURA_REPO_ID} file {AURA_WEIGHTS_FILE} (a safetensors file despite "
        "its .pt name) with the default AuraConfig, or an AuraConfig matching the file."
    )
    if not path.is_file():
        raise AuraWeightsError(f"AuraEquiVAE weights file {str(path)!r} does not exist. {advice}")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AuraWeightsError(
            f"AuraEquiVAE weights file {str(path)!r} could not be read as safetensors "
            f"({type(exc).__name__}: {exc}). {advice}"
        ) from exc

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched)}")
        raise AuraWeightsError(
            f"AuraEquiVAE weights file {str(path)!r} does not match the model "
            f"(config {model.config}): " + "; ".join(problems) + f". {advice}"
        )
    model.load_state_dict(state, strict=True, assign=assign)
    return model
