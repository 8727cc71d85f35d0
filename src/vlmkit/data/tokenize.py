"""Training examples: the token ids and labels LLaVA's ORIGINAL training code makes of a record.

This is the one implementation of LLaVA tokenisation and label masking in vlmkit: ``vlmkit
data tokenize`` writes its output, ``vlmkit data check`` measures it, and training batches
are built from it. It follows ``llava/train/train.py`` of haotian-liu/LLaVA at its latest
commit (train.py last changed in 879ef31, 2024-01-31), template by template:

==================  ==================  =====================================================================
template            original function   what is trained (labels != -100)
==================  ==================  =====================================================================
plain               preprocess_plain    the caption and the separator "\\n" after it; the human turn is
                                        REPLACED by a bare ``<image>`` (its text never reaches the model)
vicuna_v1,          preprocess_v1       each answer from its first token (the "▁" of "ASSISTANT: " goes with
llava_v1                                it) through its "</s>"
llama_2,            preprocess_llama_2  each answer, the space before "</s>" (its own "▁" token) and "</s>"
llava_llama_2,
mistral_instruct
mpt, chatml_direct  preprocess_mpt      the "\\n" after "<|im_start|>assistant" and each answer; the rounds
                                        are counted without the last "<|im_end|>", so the result depends on
                                        the tokenizer's BOS and ``legacy`` (see ``_mpt``)
qwen_1_5, qwen_2,   preprocess_qwen,    LLaVA-NeXT repository (its train.py): each answer turn whole, and the
qwen_2_5,           preprocess_llama3   structure tokens of every turn (see :class:`TurnFormat`)
llava_llama_3
==================  ==================  =====================================================================

Quirks kept, because the training sees them:

* ``preprocess_multimodal``: in a record with an image, every turn that holds ``<image>`` (an answer too)
  is rewritten as ``"<image>\\n" + rest.strip()`` (all placeholders of that turn collapse into one, moved
  to the front); then a leading gpt turn is dropped. A text-only record's ``<image>`` stays text (but plain
  always tokenises with ``tokenizer_image_token``).
* Round lengths are measured by tokenising each round on its own, and corrected by the number of
  tokens that differ in context: ``-2`` / ``-1`` on the instruction, and since 879ef31 a ``legacy``-
  dependent ``-1`` (v1, non-legacy tokenizers, rounds after the first) or ``+1`` (mpt, legacy
  tokenizers, rounds after the first). The LLaVA-1.5 release code (44e0562) had neither: its v1
  mismatched every multi-turn record with a non-legacy tokenizer, and its mpt added
  ``len(tokenizer_image_token(sep))`` per round instead of the ``-1``.
* Records with an image are tokenised with ``tokenizer_image_token`` (one -200 per ``<image>``) and NOT
  truncated by the tokenizer; text-only records are truncated to ``model_max_length`` when tokenised.
  The batch collator then cuts both to ``model_max_length`` ids, and the model cuts again after the image
  features are inserted (``tokenizer_model_max_length``).
* ``pad_token = unk_token``, so ``total_len`` does not count ``<unk>`` tokens, and the model drops them
  from the sequence (its attention mask is ``input_ids != pad``).

Where the original would go on silently with a wrong record, or crash, :func:`tokenize` raises
:class:`RecordError` naming the record and the template:

* "tokenization mismatch": the rounds do not add up to the sequence, and the original masks EVERY label
  ("WARNING: tokenization mismatch: N vs. M. (ignored)") and trains on the record with loss 0;
* every label masked after truncation to ``max_length`` (the answer lies beyond it);
* what the original crashes on: roles that do not alternate once a leading gpt turn is dropped (it
  asserts), a role other than human / gpt (KeyError), more than one image, ``<image>`` in two turns of
  a one-image record (the model runs out of image features), plain's two asserts; and ``<unk>`` in the
  text (the model drops it from the sequence).

Records the original trains on in its own way are trained the same way (a dataset trains in vlmkit as
it did in the original); ``vlmkit data check`` reports each as a warning, and ``strict=True``
(``--strict``) refuses them. :data:`QUIRKS` lists them.

Example:
    >>> enc = OriginalEncoder.from_folder("tests/fixtures/tokenizers/llama-spm")
    >>> ex = tokenize(record, "llava_v1", enc, max_length=2048)
    >>> ex.to_json()   # {"id": ..., "input_ids": [1, ...], "labels": [-100, ...]}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import TemplateError
from ..runtime.templates import Template, get_template, render
from ..runtime.tokens import IMAGE_TOKEN_INDEX, tokenizer_image_token
from .encoders import Encoder
from .records import ASSISTANT, IMAGE_TOKEN, SYSTEM, USER, DataError, Record

IGNORE_INDEX = -100  # llava/constants.py
# train.py's IS_TOKENIZER_GREATER_THAN_0_14: LLaVA pins tokenizers==0.15.1, so its legacy corrections apply.
TOKENIZERS_AT_LEAST_0_14 = True


class RecordError(DataError):
    """A record the original training code would train on wrongly (or crash on).

    Attributes:
        record_id: the record's id.
        template: the conversation template.
        code: "mismatch", "masked", "roles", "images", "unk", "unrenderable" or "unsupported"; with
            ``strict``, also a code of :data:`QUIRKS`.
        reason: what is wrong, without the record's name.
    """

    def __init__(self, record: Record, template: str, code: str, reason: str, *, hint: str | None = None):
        super().__init__(f"{record.name()}, template {template!r}: {reason}", hint=hint)
        self.record_id, self.template, self.code, self.reason = record.id, template, code, reason


@dataclass(frozen=True)
class Example:
    """What the training sees of one record.

    Attributes:
        id: the record's id.
        input_ids: token ids, -200 where an image goes, cut to ``max_length`` as the collator does.
        labels: ``input_ids`` with -100 where no loss is taken.
        images: the record's image paths.
        length: the number of ids before the cut.
        image_tokens: features per image, when known (the model inserts them at each -200).
        marks: how many -200 the ids hold before the cut: 0 for an image without a placeholder (the model
            never sees it), 1 for plain's ``<image>`` in a text-only record (the dummy image's features).
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    images: tuple[str, ...]
    length: int
    image_tokens: int | None = None
    marks: int = 0

    @property
    def trained(self) -> int:
        """How many positions carry a label."""
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def expanded_length(self) -> int | None:
        """The sequence length the language model sees (before its cut), image features included."""
        if self.image_tokens is None and self.marks:
            return None
        return self.length + self.marks * ((self.image_tokens or 1) - 1)

    def to_json(self) -> dict:
        return {"id": self.id, "input_ids": self.input_ids, "labels": self.labels}


@dataclass
class _Masked:
    ids: list[int]  # the whole prompt's ids (before any cut)
    labels: list[int]
    cur_len: int | None  # None: this preprocess has no mismatch check (plain)
    stopped: str | None = None  # why the round loop ended early
    cut_by_tokenizer: bool = False  # text-only: the original's tokenizer call already truncated the ids


def _mask(labels: list[int], start: int, stop: int | None = None) -> None:
    """``target[start:stop] = IGNORE_INDEX`` with a tensor's slice semantics (negative bounds included)."""
    for k in range(*slice(start, stop).indices(len(labels))):
        labels[k] = IGNORE_INDEX


def _counter(enc: Encoder, has_image: bool) -> Callable[[str], int]:
    """How the original measures a piece of the prompt: ``len(tokenizer_image_token(x))`` or ``len(tokenizer(x))``."""
    if has_image:
        return lambda text: len(tokenizer_image_token(text, enc))
    return lambda text: len(enc.encode(text))


def _prompt_ids(prompt: str, enc: Encoder, has_image: bool) -> list[int]:
    """The whole prompt's ids. The original cuts text-only prompts right here (``tokenizer(..., truncation=True,
    max_length=model_max_length)``) and image prompts only in the collator; masking positions beyond the cut is
    a no-op, so the labels are the same either way, and the cut is made once, in ``_finish``."""
    if has_image:
        return tokenizer_image_token(prompt, enc)
    return enc.encode(prompt)


def _rounds(labels: list[int], pieces: Sequence[str], sep: str, count: Callable[[str], int], *, start: int,
            instruction_offset: int, later_round: int) -> tuple[int, str | None]:
    """The loop all three chat preprocessors share: mask each round's instruction, advance by its length.

    Args:
        pieces: the rounds (the prompt split at the end-of-answer separator).
        sep: the text between instruction and answer ("ASSISTANT: " etc.); ``parts[0] += sep``.
        start: ``cur_len`` before the first round (1: BOS masked; 0 for mpt).
        instruction_offset: subtracted from the instruction's standalone length (-2 / -1 in the original).
        later_round: added to both lengths for rounds after the first (the ``legacy`` corrections).

    Returns:
        ``(cur_len, why the loop stopped early or None)``.
    """
    cur = start
    _mask(labels, 0, cur)
    for i, rou in enumerate(pieces):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            return cur, (f"round {i + 1} has {len(parts) - 1} {sep!r} separators, not one, so the original "
                         "stops counting there")
        round_len = count(rou)
        instruction_len = count(parts[0] + sep) - instruction_offset
        if i != 0:
            round_len += later_round
            instruction_len += later_round
        _mask(labels, cur, cur + instruction_len)
        cur += round_len
    _mask(labels, cur)
    return cur, None


def _chat(texts: list[str], tpl: Template) -> str:
    return render(tpl, [((USER, ASSISTANT)[j % 2], text) for j, text in enumerate(texts)])


def _v1(texts, tpl, enc, has_image, roles) -> _Masked:
    """preprocess_v1 (vicuna_v1 / llava_v1: TWO style, answers end with "</s>")."""
    prompt = _chat(texts, tpl)
    ids = _prompt_ids(prompt, enc, has_image)
    labels = list(ids)
    # `i != 0 and not tokenizer.legacy and IS_TOKENIZER_GREATER_THAN_0_14`: in context, the text after
    # "</s>" gets no "▁" from a non-legacy tokenizer, standalone it does: one token fewer per later round.
    if enc.legacy is None and prompt.count(tpl.sep2) > 1:
        raise _Refuse("unsupported", "the original reads tokenizer.legacy for rounds after the first, and this "
                                     "tokenizer has no such attribute (AttributeError)")
    later = -1 if TOKENIZERS_AT_LEAST_0_14 and enc.legacy is False else 0
    cur, stopped = _rounds(labels, prompt.split(tpl.sep2), tpl.sep + tpl.roles[1] + ": ", _counter(enc, has_image),
                           start=1, instruction_offset=2, later_round=later)
    return _Masked(ids, labels, cur, stopped, cut_by_tokenizer=not has_image)


def _llama_2(texts, tpl, enc, has_image, roles) -> _Masked:
    """preprocess_llama_2 (llama_2 / llava_llama_2 / mistral_instruct: "[INST] q [/INST] a </s>")."""
    prompt = _chat(texts, tpl)
    ids = _prompt_ids(prompt, enc, has_image)
    labels = list(ids)
    # sep is hard-coded "[/INST] "; no legacy correction in this function.
    cur, stopped = _rounds(labels, prompt.split(tpl.sep2), "[/INST] ", _counter(enc, has_image),
                           start=1, instruction_offset=2, later_round=0)
    return _Masked(ids, labels, cur, stopped, cut_by_tokenizer=not has_image)


def _mpt(texts, tpl, enc, has_image, roles) -> _Masked:
    """preprocess_mpt (mpt / chatml_direct: ChatML without newlines between turns).

    The prompt is split at "<|im_end|>" and regrouped as [system + user + assistant], [user + assistant], ...;
    the "<|im_end|>" that ends each group is not counted by its own group, and ``cur_len`` starts at 0 (no
    BOS mask). So the counts only add up when the next group's standalone BOS (or, from the second round on,
    the legacy ``+1``) stands in for the missing "<|im_end|>" -- and the last "<|im_end|>" is never counted:
    single-round records always mismatch (haotian-liu/LLaVA#1706: LLaVA-1.6-34B fine-tuning at loss 0).
    """
    prompt = _chat(texts, tpl)
    ids = _prompt_ids(prompt, enc, has_image)
    labels = list(ids)
    rounds = prompt.split(tpl.sep)
    groups = [tpl.sep.join(rounds[:3])] + [tpl.sep.join(rounds[k:k + 2]) for k in range(3, len(rounds), 2)]
    # `i != 0 and getattr(tokenizer, 'legacy', False) and IS_TOKENIZER_GREATER_THAN_0_14`
    later = 1 if TOKENIZERS_AT_LEAST_0_14 and enc.legacy else 0
    cur, stopped = _rounds(labels, groups, tpl.sep + tpl.roles[1], _counter(enc, has_image),
                           start=0, instruction_offset=1, later_round=later)
    return _Masked(ids, labels, cur, stopped, cut_by_tokenizer=not has_image)


def _plain(texts, tpl, enc, has_image, roles) -> _Masked:
    """preprocess_plain (projector pre-training): ``"<image>" + answer + sep``; no mismatch check.

    Always ``tokenizer_image_token``, image or not (the asserts are in ``_plain_turns``).
    """
    prompt = IMAGE_TOKEN + texts[1] + tpl.sep  # the human turn's text is dropped: source[0]['value'] = "<image>"
    ids = tokenizer_image_token(prompt, enc)
    labels = list(ids)
    _mask(labels, 0, len(tokenizer_image_token(IMAGE_TOKEN, enc)))
    return _Masked(ids, labels, None)


@dataclass(frozen=True)
class TurnFormat:
    """A per-turn preprocessor of the LLaVA-NeXT repository's train.py (``preprocess_qwen``, ``preprocess_llama3``).

    Both build the ids turn by turn: ``apply_chat_template([{"role": "system", "content": system}])``, then
    ``apply_chat_template([turn])`` for each turn (tokenised without added special tokens, as apply_chat_template
    does), labels IGNORE for "user" and "system" turns and the turn's own ids for any other role; then EVERY id
    in the unmask list gets its label back, inside user and system turns too; then ``<image>`` ids become -200.
    ``<image>`` is a special token only when the record has an image (the original adds it to a copy of the
    tokenizer, at id ``len(tokenizer)``: that id, not -200, is the label of an ``<image>`` inside an answer).

    Attributes:
        system: the system message (the function's default: the template's own system text is NOT used).
        turn: one message as the chat template renders it alone, with ``{role}`` and ``{content}``.
        trim: the chat template strips the content (Meta's ``| trim``).
        drop: ids cut from the front of every turn after the system one (``[1:]``: each turn's BOS).
        unmask_ids: ids written into the code (preprocess_qwen's 198, "\\n" in the Qwen2 vocabulary).
        unmask_tokens: token strings looked up with ``convert_tokens_to_ids``: a string that is no token gives
            the unk id, None on these tokenizers, which matches nothing.
        unmask_additional: also ``tokenizer.additional_special_tokens_ids``, which the original unpacks into
            ``im_start, im_end``: a tokenizer that lists other than two of them fails there.
    """

    system: str
    turn: str
    trim: bool = False
    drop: int = 0
    unmask_ids: tuple[int, ...] = ()
    unmask_tokens: tuple[str, ...] = ()
    unmask_additional: bool = False


# preprocess_qwen resets the tokenizer's chat template to a system-less ChatML, and is called without a
# system_message: every qwen template trains with "You are a helpful assistant." (qwen_2_5's own system too).
_QWEN = TurnFormat("You are a helpful assistant.", "<|im_start|>{role}\n{content}<|im_end|>\n",
                   unmask_ids=(198,), unmask_additional=True)
# preprocess_llama3 uses the tokenizer's own chat template: Meta's Llama-3-Instruct one, which writes the BOS
# text before the first (here: the only) message and trims the content.
_LLAMA_3 = TurnFormat(get_template("llava_llama_3").system,
                      "<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
                      trim=True, drop=1, unmask_tokens=("<|begin_of_text|>", "<|start_header_id|>",
                                                        "<|end_header_id|>", "<|eot_id|>", "\n\n"))
# dispatched in the original on conv.version: "qwen" (qwen_1_5, qwen_2, qwen_2_5) and "llama_v3"
TURN_FORMATS: dict[str, TurnFormat] = {"qwen_1_5": _QWEN, "qwen_2": _QWEN, "qwen_2_5": _QWEN, "llava_llama_3": _LLAMA_3}


def _per_turn(texts, tpl, enc, has_image, roles) -> _Masked:
    """preprocess_qwen / preprocess_llama3 (see :class:`TurnFormat`); no truncation, no mismatch check."""
    fmt = TURN_FORMATS[tpl.name]
    vocab = getattr(enc, "vocab", None)
    if vocab is None:
        raise _Refuse("unsupported", f"template {tpl.name!r} is tokenised with the original checkpoint's tokenizer "
                                     "only", hint="pass the original LLaVA-NeXT checkpoint as --model")
    image_id = enc.next_id if has_image else vocab.token_id(IMAGE_TOKEN)  # tokenizer.convert_tokens_to_ids("<image>")
    unmask = set(fmt.unmask_ids) | {vocab.token_id(t) for t in fmt.unmask_tokens} - {None}
    if fmt.unmask_additional:
        extra = enc.additional_special_tokens
        if len(extra) != 2:
            raise _Refuse("unsupported", f"the tokenizer lists {len(extra)} additional special tokens "
                                         f"({', '.join(extra) or 'none'}): preprocess_qwen unpacks them into "
                                         "(im_start, im_end) and fails (ValueError)",
                          hint="train with the tokenizer the checkpoint's language model ships")
        unmask |= {vocab.token_id(t) for t in extra}

    def encode(role: str, content: str) -> list[int]:
        text = fmt.turn.format(role=role, content=content.strip() if fmt.trim else content)
        if not has_image:
            return vocab.encode(text, special=False)
        # <image> is a special added token: the text around it is tokenised piece by piece
        chunks = [vocab.encode(chunk, special=False) for chunk in text.split(IMAGE_TOKEN)]
        return [i for k, chunk in enumerate(chunks) for i in ([image_id] if k else []) + chunk]

    ids = encode("system", fmt.system)
    labels = [IGNORE_INDEX] * len(ids)
    for role, text in zip(roles, texts):
        turn = encode(role, text)[fmt.drop:]
        ids += turn
        labels += [IGNORE_INDEX] * len(turn) if role in (USER, SYSTEM) else turn
    labels = [i if i in unmask else label for i, label in zip(ids, labels)]
    ids = [IMAGE_TOKEN_INDEX if i == image_id else i for i in ids]
    return _Masked(ids, labels, None)


# The original dispatches on conv.sep_style / conv.version (PLAIN, LLAMA_2, version "v1*", version "mpt";
# LLaVA-NeXT adds "qwen" and "llama_v3"); this is the same mapping, keyed by template name. llava_v0 (SINGLE
# style) would take the generic `preprocess` path with "### " signals, which vlmkit does not implement.
PREPROCESS: dict[str, Callable[..., _Masked]] = {
    "plain": _plain,
    "vicuna_v1": _v1, "llava_v1": _v1,
    "llama_2": _llama_2, "llava_llama_2": _llama_2, "mistral_instruct": _llama_2,
    "mpt": _mpt, "chatml_direct": _mpt,
    **dict.fromkeys(TURN_FORMATS, _per_turn),
}


class _Refuse(Exception):
    def __init__(self, code: str, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.code, self.reason, self.hint = code, reason, hint


def _multimodal(text: str) -> str:
    """preprocess_multimodal: ``"<image>\\n" + text.replace("<image>", "").strip()``, stripped.

    vlmkit has no ``mmtag`` template and refuses ``mm_use_im_start_end`` checkpoints, the two cases in which
    the original wraps the placeholder in further tokens.
    """
    if IMAGE_TOKEN not in text:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


# Records the original trains on in its own way, which their author may not have meant. vlmkit trains them
# the same way; `data check` reports each (a warning saying what the original does; check.PROBLEMS describes
# them) and strict mode refuses them.
QUIRKS = ("leading_gpt", "image_in_answer", "image_unplaced", "image_merged", "text_placeholder", "roles_ignored")


@dataclass
class _Turns:
    texts: list[str]  # what the preprocess function gets
    has_image: bool  # `'image' in record`: tokenizer_image_token (no truncation) instead of tokenizer()
    quirks: list[tuple[str, str]]  # (code of QUIRKS, what the original does with this record)
    roles: list[str] | None = None  # each text's role; None: alternating user / assistant from a user turn


def _turns(record: Record, plain: bool) -> _Turns:
    """The turns as the original's preprocess function gets them (``__getitem__``, ``preprocess_multimodal``, the
    leading-turn drop), the patterns it trains on in its own way, and a refusal for what it crashes on.

    The placeholders of a record with several images are not looked at (``tokenize`` refuses it before).
    """
    turns, has_image = record.turns, bool(record.images)
    # preprocess_multimodal runs on every turn of a record with an image, before anything looks at roles
    texts = [_multimodal(t.text) if has_image else t.text for t in turns]
    if plain:
        return _plain_turns(record, texts, has_image)
    if not turns:
        raise _Refuse("roles", "no conversation turns (the original fails on source[0])")
    unknown = next((t.role for t in turns if t.role not in (USER, ASSISTANT)), None)
    if unknown is not None:
        raise _Refuse("roles", f"role {unknown!r}: the original knows only human and gpt (KeyError)",
                      hint="use human / gpt (user / assistant)")
    quirks = []
    first = 0
    if turns[0].role != USER:  # `if roles[source[0]["from"]] != conv.roles[0]: source = source[1:]`
        first = 1
        quirks.append(("leading_gpt", "turn 1 is gpt's: the original drops it (source = source[1:]) and trains on "
                                      "the turns after it" + (", <image> included" if IMAGE_TOKEN in texts[0] else "")))
    if first == len(turns):
        raise _Refuse("roles", "the only turn is gpt's, which the original drops: nothing is left to train on")
    for j, turn in enumerate(turns[first:]):
        expected = (USER, ASSISTANT)[j % 2]
        if turn.role != expected:  # `assert role == conv.roles[j % 2]`
            raise _Refuse("roles", f"turn {first + j + 1} is {turn.role!r} where {expected!r} is due: roles must "
                                   "alternate human/gpt after the first human turn (the original asserts)")
    if len(record.images) <= 1:  # several images: refused by tokenize, their placeholders counted by `data check`
        quirks += _placeholders(record, texts, first)
    return _Turns(texts[first:], has_image, quirks)


def _placeholders(record: Record, texts: list[str], first: int) -> list[tuple[str, str]]:
    """Where the placeholders of a record with one image (or none) are, in the turns the original keeps."""
    holders = [j for j in range(first, len(texts)) if IMAGE_TOKEN in texts[j]]
    if not record.images:
        return [("text_placeholder", f"'<image>' in turn {holders[0] + 1} of a record without an image: the original "
                                     "tokenises it as the text '<image>'")] if holders else []
    if len(holders) > 1:
        raise _Refuse("images", f"<image> in turns {[j + 1 for j in holders]} for one image: the original model "
                                "code runs out of image features at the second placeholder and fails",
                      hint="keep one '<image>', in the question that shows the image")
    if not holders:
        return [("image_unplaced", "an image but no <image> placeholder" + (" after the dropped turn 1" if first and
                                   IMAGE_TOKEN in texts[0] else "") + ": the original loads the image, but its ids "
                                   "hold no image token, so the model never sees it and the record trains as text "
                                   "only")]
    j, found = holders[0], []
    if (j - first) % 2:
        found.append(("image_in_answer", f"<image> in answer turn {j + 1}: the original moves it to the front of that "
                                         "answer ('<image>\\n' + the answer), so the image sits inside the trained "
                                         "answer"))
    count = record.turns[j].text.count(IMAGE_TOKEN)
    if count > 1:
        found.append(("image_merged", f"turn {j + 1} holds {count} <image> for one image: the original keeps one, "
                                      "moved to the front of the turn"))
    return found


def _next_multimodal(text: str) -> str:
    """LLaVA-NeXT's preprocess_multimodal: only a turn with exactly one ``<image>``, not at its start, is rewritten
    as ``"<image>\\n" + rest.strip()`` (stripped); a turn with several keeps them where they are. It also deletes
    "QA_GT_caption_based_noisy" from every turn (a clean-up of one video data set, left in the code)."""
    if text.count(IMAGE_TOKEN) == 1 and not text.startswith(IMAGE_TOKEN):
        text = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
    return text.replace("QA_GT_caption_based_noisy", "")


def _next_turns(record: Record) -> _Turns:
    """The turns as LLaVA-NeXT's per-turn preprocessors get them: preprocess_multimodal (records with an image),
    a leading gpt turn dropped, then every turn in order whatever its role (no alternation assert)."""
    turns, has_image = record.turns, bool(record.images)
    texts = [_next_multimodal(t.text) if has_image else t.text for t in turns]
    if not turns:
        raise _Refuse("roles", "no conversation turns (the original fails on source[0])")
    if turns[0].role not in (USER, ASSISTANT):  # `roles[source[0]["from"]]` knows human and gpt only
        raise _Refuse("roles", f"turn 1 has role {turns[0].role!r}: the original reads the first turn's role from "
                               "{human, gpt} (KeyError)", hint="start with the human's turn")
    first, quirks = 0, []
    if turns[0].role == ASSISTANT:
        first = 1
        quirks.append(("leading_gpt", "turn 1 is gpt's: the original drops it (source = source[1:]) and trains on "
                                      "the turns after it" + (", <image> included" if IMAGE_TOKEN in texts[0] else "")))
    several = next((j for j in range(first, len(texts)) if texts[j].count(IMAGE_TOKEN) > 1), None)
    if len(record.images) == 1 and several is not None:
        raise _Refuse("images", f"turn {several + 1} holds {texts[several].count(IMAGE_TOKEN)} <image> for one image: "
                                "LLaVA-NeXT keeps them all and its model code runs out of image features",
                      hint="keep one '<image>', in the question that shows the image")
    if len(record.images) <= 1:  # several images: refused by tokenize, their placeholders counted by `data check`
        quirks += _placeholders(record, texts, first)
    return _Turns(texts[first:], has_image, quirks, [t.role for t in turns[first:]])


def _plain_turns(record: Record, texts: list[str], has_image: bool) -> _Turns:
    """preprocess_plain reads no roles: two turns, <image> in the first (its two asserts), the second is the caption."""
    if len(texts) != 2:
        raise _Refuse("roles", f"plain takes exactly one human and one gpt turn, this record has {len(texts)} "
                               "turns (the original asserts len(source) == 2)")
    if IMAGE_TOKEN not in texts[0]:
        raise _Refuse("images", "plain needs <image> in the human turn (the original asserts it)")
    if IMAGE_TOKEN in texts[1]:
        raise _Refuse("images", "<image> in the caption as well: the original inserts two image tokens for one "
                                "image and the model code fails")
    quirks = []
    roles = [t.role for t in record.turns]
    if roles != [USER, ASSISTANT]:
        quirks.append(("roles_ignored", f"roles {' / '.join(roles)}: plain ignores them; the original replaces turn "
                                        "1 by <image> and trains turn 2 as the caption"))
    if not has_image:
        quirks.append(("text_placeholder", "'<image>' in turn 1 of a record without an image: plain still puts an "
                                           "image token there, and the original model inserts the features of its "
                                           "all-zero dummy image"))
    return _Turns(texts, has_image, quirks)


def structure(record: Record, template: str | Template | None = None) -> list[tuple[str, str]]:
    """How the original's preprocessing meets ``record``'s turns and placeholders, without tokenising.

    Args:
        record: the record (one image at most is looked at).
        template: the training's template; None: a chat template (every template but plain).

    Returns:
        ``[("roles" | "images", why)]`` when the original would fail on the record, else its :data:`QUIRKS`
        as ``(code, what the original does)``.
    """
    name = None if template is None else get_template(template).name
    try:
        return (_next_turns(record) if name in TURN_FORMATS else _turns(record, name == "plain")).quirks
    except _Refuse as r:
        return [(r.code, r.reason)]


def tokenize(record: Record, template: str | Template, encoder: Encoder, *, max_length: int,
             image_tokens: int | None = None, strict: bool = False) -> Example:
    """The ids and labels LLaVA's training code makes of ``record`` with ``template``.

    Args:
        record: the record (images, turns).
        template: the conversation template (``--version`` of the original training), name or Template.
        encoder: the tokenizer (see ``encoders``).
        max_length: ``model_max_length`` / ``tokenizer_model_max_length`` of the training.
        image_tokens: how many features the record's image becomes (576 for LLaVA-1.5 at 336 px; size
            dependent for anyres). When given, a record whose every label falls beyond ``max_length`` once
            the features are inserted is refused too.
        strict: refuse the records the original trains on in its own way (:data:`QUIRKS`) instead of
            training them as it does.

    Returns:
        The :class:`Example`.

    Raises:
        RecordError: the record would be trained on wrongly (or the original would fail on it).
    """
    tpl = get_template(template)
    preprocess = PREPROCESS.get(tpl.name)
    try:
        if preprocess is None:
            raise _Refuse("unsupported", f"vlmkit has no training preprocessing for template {tpl.name!r} "
                                         f"(known: {', '.join(PREPROCESS)})", hint="pass --template with one of them")
        if len(record.images) > 1:
            raise _Refuse("images", f"{len(record.images)} images; " + (
                "vlmkit tokenises one image per record (LLaVA-NeXT's training also takes a list of images, which "
                "vlmkit does not train yet)" if preprocess is _per_turn else
                "the original LLaVA training takes one image per record ('image' is a single path)"))
        turns = _next_turns(record) if preprocess is _per_turn else _turns(record, plain=preprocess is _plain)
        if strict and turns.quirks:
            code, what = turns.quirks[0]
            raise _Refuse(code, f"{what} (refused by --strict)",
                          hint="fix the record, or leave out --strict to train it as the original does")
        try:
            masked = preprocess(turns.texts, tpl, encoder, turns.has_image, turns.roles)
        except TemplateError as e:
            raise _Refuse("unrenderable", e.message, e.hint) from None
        _check_counts(masked, encoder, max_length, tpl)
        if encoder.pad_token_id is not None and encoder.pad_token_id in masked.ids:
            raise _Refuse("unk", f"the text produces the pad token of LLaVA's training (id {encoder.pad_token_id}: "
                                 "<unk>, or the tokenizer's own pad token when it has no <unk>), which the original "
                                 "model code silently removes from the sequence",
                          hint="remove that token's literal text (e.g. '<unk>', '<|endoftext|>') from the record")
        return _finish(record, masked, max_length, image_tokens)
    except _Refuse as r:
        raise RecordError(record, tpl.name, r.code, r.reason, hint=r.hint) from None


def _check_counts(masked: _Masked, encoder: Encoder, max_length: int, tpl: Template) -> None:
    """The original's ``if cur_len < model_max_length and cur_len != total_len: target[:] = IGNORE_INDEX``."""
    if masked.cur_len is None or masked.cur_len >= max_length:
        return
    seen = masked.ids[:max_length] if masked.cut_by_tokenizer else masked.ids  # total_len of the original
    total = sum(1 for t in seen if t != encoder.pad_token_id)
    if masked.cur_len == total:
        return
    why = masked.stopped or "the rounds, tokenised one by one, do not add up to the whole prompt"
    raise _Refuse("mismatch", f"tokenization mismatch: {masked.cur_len} vs. {total}: {why}. The original prints "
                              "'WARNING: tokenization mismatch ... (ignored)' and trains on this record with every "
                              "label masked", hint=f"check that {tpl.name!r} is the model's template and the "
                                                   "tokenizer its own; fix or drop the record")


def _finish(record: Record, masked: _Masked, max_length: int, image_tokens: int | None) -> Example:
    ids, labels = masked.ids[:max_length], masked.labels[:max_length]  # the collator's cut
    if not any(label != IGNORE_INDEX for label in labels):
        cut = len(masked.ids) > max_length
        raise _Refuse("masked", "every label is masked" + (f": the answer lies beyond --max-length {max_length} "
                                                           f"(the record has {len(masked.ids)} tokens)" if cut
                                                           else " (no answer text to train on)"),
                      hint="raise --max-length, shorten the record, or drop it")
    marks = masked.ids.count(IMAGE_TOKEN_INDEX)
    if image_tokens is not None and marks:
        expanded, surviving = 0, False
        for token, label in zip(ids, labels):
            if label != IGNORE_INDEX and expanded < max_length:
                surviving = True
                break
            expanded += image_tokens if token == IMAGE_TOKEN_INDEX else 1
        if not surviving:
            raise _Refuse("masked", f"every label is masked once the image's {image_tokens} features are inserted: "
                                    f"the answer starts beyond --max-length {max_length}",
                          hint="raise --max-length or shorten the question")
    return Example(record.id, ids, labels, tuple(record.images), len(masked.ids), image_tokens, marks)
