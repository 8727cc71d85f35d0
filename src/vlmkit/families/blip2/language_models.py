"""BLIP-2's language models as a table: one frozen row per kind LAVIS pairs with the Q-Former.

Everything that differs between ``Blip2OPT`` (``blip2_opt.py``) and ``Blip2T5`` (``blip2_t5.py``),
and between their transformers ports, is a cell here; the converter, the reference, the parity
check, the tiny models and the chat backend read the row instead of comparing names. Adding a
language model (InstructBLIP's Vicuna, issue 20) is adding a row (and its tiny model in ``tiny.py``).

Imports nothing heavy: recognising a checkpoint reads these rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LanguageModel:
    """One language model kind of BLIP-2, as LAVIS builds it and transformers ports it.

    Attributes:
        name: the row key (``OriginalBlip2.lm.name``, ``tiny`` variants).
        original_prefix: where LAVIS's module holds the LM (``opt_model.``): its names in the checkpoint.
        original_projection: LAVIS's linear map from the Q-Former to the LM's width (``opt_proj``).
        title: the model in words (messages, ``inspect``, the conversion summary).
        model_types: ``config.json`` ``model_type`` values of a ``--language-model`` folder that fit.
        known: width of the projection's output -> the model LAVIS downloads for it (hints only).
        transformers_class: the class LAVIS (and the reference) instantiates from the LM's config.
        causal: decoder-only (LAVIS feeds queries + prompt to the decoder and generates after them), or
            seq2seq (the encoder reads queries + prompt; the decoder starts from ``decoder_start_token_id``).
            It is also transformers' ``Blip2Config.use_decoder_only_language_model``.
        embedding: the input embedding under the LM's own names (its bulk dtype, its row count).
        copies: names the LM's state dict holds as copies of ``embedding`` (one parameter in the module):
            never converted, tied again on load.
        copies_why: why, in the converter's words.
        head_why: why a tied output layer (``lm_head.weight``) is dropped by the converter.
        stored_head_is_copy: True: when the LM's config says tied, a stored ``lm_head`` is only a copy of the
            embedding (OPT: LAVIS's ``state_dict()`` writes it) and no stored head means tied as well; False:
            tied only when ``config.json`` says so and no head is stored (T5: transformers 5's ``T5Config``
            always reports tied, so the file's own flag is read).
        headless: (start, where) for files saved from the base model without its head (older OPT hub files
            saved from ``OPTModel``: names start with ``decoder.``; in the causal LM they live under ``model.``).
        padding_side: how the converted tokenizer pads a batch for generation (None: the tokenizer's own).
        prompt: (template name, question form) of LAVIS's question answering (chat, model card).
        forward_suffix: what LAVIS's training forward appends to the text input (``Blip2OPT.forward``: ``"\\n"``).
        min_new_tokens: tokens before EOS may come. LAVIS passes ``min_length=1``; transformers counts it over
            the ids it was given: none for a causal LM fed ``inputs_embeds`` only (so 1 new token), the decoder
            start token for T5 (so 0).
        eos_at_newline: generation stops at the ``"\\n"`` token (``Blip2OPT.eos_token_id``), not the config's EOS.
        text_config_changes: what LAVIS changes in the LM's config (``blip2_t5.py``: ``dense_act_fn="gelu"``;
            ``bos_token_id=1`` as transformers' conversion script sets it).
    """

    name: str
    original_prefix: str
    original_projection: str
    title: str
    model_types: tuple[str, ...]
    known: dict[int, str]
    transformers_class: str
    causal: bool
    embedding: str
    copies: tuple[str, ...]
    copies_why: str
    head_why: str
    stored_head_is_copy: bool
    headless: tuple[str, str] | None
    padding_side: str | None
    prompt: tuple[str, str]
    forward_suffix: str
    min_new_tokens: int
    eos_at_newline: bool
    text_config_changes: dict = field(default_factory=dict)


# transformers' Blip2ForConditionalGeneration names, the same for every language model
HF_PREFIX = "language_model."
HF_PROJECTION = "language_projection"
HEAD = "lm_head.weight"

ROWS: dict[str, LanguageModel] = {row.name: row for row in (
    LanguageModel(
        name="opt", original_prefix="opt_model.", original_projection="opt_proj", title="OPT", model_types=("opt",),
        known={2560: "facebook/opt-2.7b", 4096: "facebook/opt-6.7b"},
        transformers_class="OPTForCausalLM", causal=True,
        embedding="model.decoder.embed_tokens.weight", copies=(), copies_why="",
        head_why="the same tensor as embed_tokens (OPT ties them; transformers re-ties)", stored_head_is_copy=True,
        headless=("decoder.", "model."),
        padding_side="left",  # a decoder-only model generates from padded batches padded on the left
        # as the BLIP-2 model cards ask
        prompt=("blip2_qa", "Question: {} Answer:"),
        forward_suffix="\n", min_new_tokens=1, eos_at_newline=True),
    LanguageModel(
        name="t5", original_prefix="t5_model.", original_projection="t5_proj", title="Flan-T5", model_types=("t5", "mt5"),
        known={2048: "google/flan-t5-xl", 4096: "google/flan-t5-xxl"},
        transformers_class="T5ForConditionalGeneration", causal=False,
        embedding="shared.weight", copies=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
        copies_why="T5 ties them",
        head_why="the same tensor as shared.weight (tie_word_embeddings)", stored_head_is_copy=False,
        headless=None, padding_side=None,
        # as LAVIS's zero-shot VQA configs do (lavis/projects/blip2/eval/vqav2_zeroshot_flant5xl_eval.yaml)
        prompt=("blip2_t5_qa", "Question: {} Short answer:"),
        forward_suffix="", min_new_tokens=0, eos_at_newline=False,
        text_config_changes={"dense_act_fn": "gelu", "bos_token_id": 1}),
)}


def row(name: str) -> LanguageModel:
    """The row called ``name`` (``opt``, ``t5``)."""
    try:
        return ROWS[name]
    except KeyError:
        raise ValueError(f"BLIP-2 has no language model {name!r} (known: {', '.join(ROWS)})") from None


def of_projection(names) -> LanguageModel | None:
    """The row whose LAVIS projection (``opt_proj.weight`` ...) is among a checkpoint's tensor names."""
    names = set(names)
    return next((r for r in ROWS.values() if f"{r.original_projection}.weight" in names), None)


def of_transformers(decoder_only: bool) -> LanguageModel:
    """The row of a transformers Blip2 folder, from its config's ``use_decoder_only_language_model`` (the first row
    of that kind: one per kind until InstructBLIP's Vicuna, which will need ``text_config.model_type`` too)."""
    return next(r for r in ROWS.values() if r.causal == decoder_only)
