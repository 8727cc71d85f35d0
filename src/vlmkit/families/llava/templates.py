"""Which conversation template an original LLaVA checkpoint is run with.

The original cli (``llava/serve/cli.py``, ``llava/eval/run_llava.py``) picks the template from
the model's name; its fallback, ``llava_v0``, fits no released LLaVA-1.5/1.6 model, so vlmkit
then takes the backbone's default (``backbones.Backbone.default_template``). The templates
themselves are shared (``runtime.templates``).
"""

from __future__ import annotations

from pathlib import Path

from .backbones import Backbone

# The original cli's rule: the first substring of the lower-cased model name that matches decides;
# nothing matches -> "llava_v0".
AUTO_SELECT: tuple[tuple[str, str], ...] = (
    ("llama-2", "llava_llama_2"),
    ("mistral", "mistral_instruct"),
    ("v1.6-34b", "chatml_direct"),
    ("v1", "llava_v1"),
    ("mpt", "mpt"),
)
AUTO_SELECT_DEFAULT = "llava_v0"


def choose_template(model_name: str) -> str:
    """The template the original cli picks for a model name (``get_model_name_from_path`` of its path)."""
    name = model_name.lower()
    return next((template for needle, template in AUTO_SELECT if needle in name), AUTO_SELECT_DEFAULT)


def get_model_name_from_path(path: str) -> str:
    """Original ``get_model_name_from_path``: last path part, or "<run>_checkpoint-N" for checkpoints."""
    parts = path.strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def template_of(path: Path, backbone: Backbone) -> str | None:
    """The original cli's choice for ``path``, else the backbone's default (None: no template is known)."""
    if not backbone.name_rule:
        return backbone.default_template
    chosen = choose_template(get_model_name_from_path(str(path)))
    return chosen if chosen != AUTO_SELECT_DEFAULT else backbone.default_template
