"""Tiny originals of every family in the layouts their releases have, and helpers to read a model card."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from vlmkit.families.blip2 import tiny as blip2_tiny
from vlmkit.families.flava import tiny as flava_tiny
from vlmkit.families.llava import tiny as llava_tiny

from ..conftest import built_once

# liuhaotian/llava-v1.6-mistral-7b's README opens with this front matter; a hub id resolves to a snapshot
# folder of the huggingface_hub cache (models--OWNER--NAME/snapshots/REVISION)
NEXT_README = "---\ninference: false\nlicense: apache-2.0\n---\n\n<br>\n\n# LLaVA Model Card\n"
NEXT_REPO = "liuhaotian/llava-v1.6-mistral-7b"


@pytest.fixture(scope="session")
def originals(tmp_path_factory):
    """Tiny originals of each family in their releases' layouts, built once for all workers (read-only)."""
    def build(root: Path) -> dict:
        clip = llava_tiny.make_clip(root / "clip-vit-tiny-patch14")
        snapshot = root / "hub" / "models--liuhaotian--llava-v1.6-mistral-7b" / "snapshots" / ("0" * 40)
        snapshot.parent.mkdir(parents=True)
        nxt = llava_tiny.make_llava_next(snapshot, clip)
        (nxt / "README.md").write_text(NEXT_README)
        sizes = blip2_tiny.TinySizes()
        blip2_heads = root / "blip2-heads.json"
        blip2_heads.write_text(json.dumps(sizes.override()))
        flava_sizes = flava_tiny.TinySizes()
        flava_heads = root / "flava-heads.json"
        flava_heads.write_text(json.dumps(flava_sizes.override()))
        return {
            "root": root, "clip": clip, "next": nxt,
            "v15": llava_tiny.make_llava15(root / "llava-v1.5-tiny", clip),
            "blip2": blip2_tiny.make_release(root / "lavis" / "blip2_pretrained_opt2.7b.pth", "opt", sizes),
            "eva": blip2_tiny.make_eva_vit(root / "eva" / "eva_vit_g.pth", sizes),
            "opt": blip2_tiny.make_language_model(root / "opt-tiny", "opt", sizes),
            "blip2-t5": blip2_tiny.make_release(root / "lavis" / "blip2_pretrained_flant5xl.pth", "t5", sizes),
            "t5": blip2_tiny.make_language_model(root / "flan-t5-tiny", "t5", sizes),
            "blip2-heads": blip2_heads,
            "flava": flava_tiny.make_flava(root / "flava-tiny", flava_sizes),
            "flava-heads": flava_heads,
        }

    return built_once(tmp_path_factory, "publish-originals", build)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card.split("---\n", 2)[1])


def hash_rows(card: str) -> dict[str, tuple[int, str]]:
    """Every ``| `name` | bytes ... | `sha256` |`` row of the card's tables."""
    rows = re.findall(r"^\| `([^`]+)` \| (\d+)[^|]* \| `([0-9a-f]{64})` \|$", card, re.M)
    return {name: (int(size), digest) for name, size, digest in rows}


def code_blocks(card: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", card, re.M | re.S)
