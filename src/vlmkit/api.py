"""The Python API; ``vlmkit.cli`` is a thin layer over these functions.

Example:
    >>> import vlmkit
    >>> vlmkit.inspect("llava-v1.5-7b")["family"]                       # doctest: +SKIP
    'llava'
    >>> vlmkit.convert("llava-v1.5-7b", "llava-1.5-7b-hf",
    ...                vision_tower="clip-vit-large-patch14-336")        # doctest: +SKIP
    >>> vlmkit.verify("llava-v1.5-7b", "llava-1.5-7b-hf",
    ...               vision_tower="clip-vit-large-patch14-336").passed  # doctest: +SKIP
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import limits
from .errors import ConfigError
from .options import LoadOptions, read_json

if TYPE_CHECKING:  # torch and the readers load with the first call, not with `import vlmkit`
    from .conversion import engine

ASSET_IMAGES = Path(__file__).parent / "assets" / "images"
DEFAULT_PROBES = [(ASSET_IMAGES / "chelsea.png", "What is shown in this image?"),
                  (ASSET_IMAGES / "rocket.png", "Describe the colours of this picture.")]


def load(path: str | Path, **load_options):
    """A model to chat with (``runtime.model.ChatModel``): original LLaVA checkpoint or transformers folder."""
    from .runtime.model import load as load_model

    return load_model(path, **load_options)


def inspect(path: str | Path) -> dict:
    """Describe a checkpoint from its headers (see ``vlmkit.inspection.inspect_checkpoint``)."""
    from .inspection import inspect_checkpoint

    return inspect_checkpoint(path)


def prepare(source: str | Path, options: LoadOptions | None = None, *, hash_sources: bool = False) -> engine.Conversion:
    """The conversion of ``source``: its family's, or the identity (re-shard, re-type) when none claims it.

    ``hash_sources``: start hashing the source's files for the manifest now, beside the planning (a
    conversion that will run; not a dry run).
    """
    from . import families
    from .conversion import engine, source_hashes
    from .tensors import open_source, resolve

    options = options or LoadOptions()
    path = resolve(source)
    if hash_sources:
        source_hashes.prefetch(path, options.vision_tower, options.model_base)
    found = families.find(path)
    if not families.can(found, "conversion"):
        return engine.identity(open_source(path))
    from huggingface_hub.errors import StrictDataclassClassValidationError

    try:
        return found.family.conversion(found, options)
    except StrictDataclassClassValidationError as error:  # transformers 5 checks each config it is handed
        cause = error.__cause__ or error
        raise ConfigError(f"{path}: transformers refuses the model config vlmkit derives from it: {cause}",
                          hint="fix that field in the checkpoint's config.json, or override it with --config") from None


def convert(source: str | Path, destination: str | Path, *, options: LoadOptions | None = None,
            max_shard_size: int | None = None, force: bool = False, dry_run: bool = False,
            progress: Callable | None = None, **load_options) -> engine.Result:
    """Convert ``source`` into the folder ``destination`` (plan checked first, written atomically).

    Args:
        source: checkpoint file, folder or hub id.
        destination: output folder; refused if it exists unless ``force``.
        options: loading options; or pass them as keywords (``dtype="float16"``, ``vision_tower=...``).
        max_shard_size: bytes per safetensors shard (at least 1; default: 5 GB, as transformers).
        force: replace an existing destination.
        dry_run: return the checked plan, write nothing.
        progress: see ``vlmkit.conversion.run``.
    """
    from .conversion import engine, output

    max_shard_size = engine.DEFAULT_MAX_SHARD if max_shard_size is None else limits.MAX_SHARD_SIZE.check(max_shard_size)
    options = options or LoadOptions(**load_options)
    conversion = prepare(source, options, hash_sources=not dry_run)
    return engine.run(conversion, destination, dtype=options.dtype, max_shard_size=max_shard_size, force=force,
                      dry_run=dry_run, progress=progress, provenance=output.provenance(options))


def verify(original: str | Path, converted: str | Path, *, options: LoadOptions | None = None,
           probes: list[tuple[Path, str]] | None = None, max_new_tokens: int = 8, **load_options):
    """Parity report (``vlmkit.verify.Report``) of a conversion against the original model.

    Args:
        probes: (image path, question) pairs; default: two bundled photos.
    """
    from . import families
    from .tensors import open_source, resolve

    options = options or LoadOptions(**load_options)
    path = resolve(original)
    open_source(converted).close()  # a truncated or missing weight file: one error, as inspect gives
    if (Path(converted) / "config.json").is_file():
        read_json(Path(converted) / "config.json")
    found = families.require(path, "verify")
    return found.family.verify(found, Path(converted), options, probes or DEFAULT_PROBES, max_new_tokens=max_new_tokens)



def score(image: str | Path, texts: list[str], model: str | Path, *, options: LoadOptions | None = None,
          **load_options) -> list[dict]:
    """Image-text matching of one image against texts: ``[{"text", "itm", "itc"}, ...]``, one per text.

    ``itm``: the probability that the text matches (the ITM head); ``itc``: the contrastive similarity.
    ``model``: a family form that can score (BLIP-2 retrieval: a transformers folder or a LAVIS checkpoint).
    """
    from .runtime.images import load_image
    from .runtime.scoring import load_scorer

    options = options or LoadOptions(**load_options)
    picture = load_image(Path(image))  # a bad image fails before the model loads
    return load_scorer(model, options=options).score(picture, list(texts))
