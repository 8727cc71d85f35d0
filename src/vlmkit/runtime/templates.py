"""Conversation templates of the original LLaVA code, as data.

Original LLaVA (``llava/conversation.py``) builds a prompt with ``Conversation.get_prompt()``,
one branch per separator style. Here a template is a frozen :class:`Template` (system prompt,
role names, separators: verbatim from the original) and a style is a row of :data:`STYLES`:
format strings for the start of the prompt and for each kind of turn. :func:`render` reproduces
``get_prompt()`` byte for byte; :func:`chat_template` turns the same rows into a Jinja chat
template for the transformers processor of a converted model.

Messages are ``(role, text)`` pairs with role "user" / "assistant" (and optionally a leading
"system" pair that replaces the template's system prompt); ``text=None`` (or "", which the
original treats alike) is an open turn, the generation prompt. Images are placed by the caller,
as the original cli does: ``"<image>\\n" + text`` in the first user message (:func:`with_image`).

Example:
    >>> render("mistral_instruct", [("user", with_image("What is this?")), ("assistant", None)])
    '[INST] <image>\\nWhat is this? [/INST]'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from enum import Enum
from typing import Sequence

from vlmkit.errors import TemplateError

IMAGE_TOKEN = "<image>"


class Style(str, Enum):
    """The original ``SeparatorStyle`` values (PLAIN, SINGLE, TWO, MPT, LLAMA_2; CHATML and LLAMA_3 of the
    LLaVA-NeXT repository's ``llava/conversation.py``)."""

    SINGLE = "single"
    TWO = "two"
    MPT = "mpt"
    PLAIN = "plain"
    LLAMA_2 = "llama_2"
    CHATML = "chatml"
    LLAMA_3 = "llama_3"


@dataclass(frozen=True)
class StyleFormat:
    """How one separator style lays out a prompt.

    Format strings use ``{system}`` (the system block, "" when the system prompt is empty),
    ``{sep}``, ``{sep2}``, ``{user}`` / ``{assistant}`` (the template's role names) and ``{msg}``.
    ``None`` marks a turn the original cannot render (it asserts or raises there). ``end`` closes every
    prompt; ``trim`` strips each message and the system prompt first (Jinja's ``| trim``).
    """

    start: str
    first_user: str
    user: str
    assistant: str | None
    first_user_open: str | None
    user_open: str
    assistant_open: str
    end: str = ""
    trim: bool = False


_L3_BOS = "<|begin_of_text|>"  # written as text by Meta's template (its bos_token)
_L3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"

STYLES: dict[Style, StyleFormat] = {
    # ret = system + sep; each turn "ROLE: msg" + sep; open turn "ROLE:"
    Style.SINGLE: StyleFormat("{system}{sep}", "{user}: {msg}{sep}", "{user}: {msg}{sep}", "{assistant}: {msg}{sep}",
                              "{user}:", "{user}:", "{assistant}:"),
    # as SINGLE, but assistant turns end with sep2 ("</s>")
    Style.TWO: StyleFormat("{system}{sep}", "{user}: {msg}{sep}", "{user}: {msg}{sep}", "{assistant}: {msg}{sep2}",
                           "{user}:", "{user}:", "{assistant}:"),
    # ChatML without newlines between turns: the roles carry "<|im_start|>...\n", sep is "<|im_end|>"
    Style.MPT: StyleFormat("{system}{sep}", "{user}{msg}{sep}", "{user}{msg}{sep}", "{assistant}{msg}{sep}",
                           "{user}", "{user}", "{assistant}"),
    # system, then each message + sep; an answered assistant turn would add sep2=None (TypeError
    # in the original): PLAIN is the pre-training format, prompt only.
    Style.PLAIN: StyleFormat("{system}", "{msg}{sep}", "{msg}{sep}", None, "", "", ""),
    # Every user turn is sep + "[INST] msg [/INST]", the first one with the system block inside;
    # assistant turns are " msg " + sep2. The original then does ret.lstrip(sep), a CHARACTER-SET
    # strip: for sep="<s>" it removes the leading "<s>" only because "[INST]" starts with "[",
    # which no LLaMA-2 template's sep contains (checked in Template.__post_init__); so the first
    # user turn is written without sep. An empty first message trips an assert there.
    Style.LLAMA_2: StyleFormat("", "[INST] {system}{msg} [/INST]", "{sep}[INST] {msg} [/INST]", " {msg} {sep2}",
                               None, "", ""),
    # LLaVA-NeXT CHATML: system + sep + "\n" only for a non-empty system (the templates' system_format
    # carries that sep + "\n"); each turn "ROLE\nmsg" + sep + "\n"; an open turn "ROLE\n".
    Style.CHATML: StyleFormat("{system}", "{user}\n{msg}{sep}\n", "{user}\n{msg}{sep}\n",
                              "{assistant}\n{msg}{sep}\n", "{user}\n", "{user}\n", "{assistant}\n"),
    # LLaVA-NeXT LLAMA_3: get_prompt() returns Meta's Llama-3-Instruct chat template applied to
    # [system] + the non-empty messages with add_generation_prompt=True: BOS text, the system message
    # (always, even empty), each message "<|start_header_id|>ROLE<|end_header_id|>\n\n" + content|trim +
    # "<|eot_id|>", then ALWAYS the assistant header; open turns are skipped.
    Style.LLAMA_3: StyleFormat(_L3_BOS + _L3_HEADER.format("system") + "{system}{sep}",
                               _L3_HEADER.format("{user}") + "{msg}{sep}", _L3_HEADER.format("{user}") + "{msg}{sep}",
                               _L3_HEADER.format("{assistant}") + "{msg}{sep}", "", "", "",
                               end=_L3_HEADER.format("{assistant}"), trim=True),
}


@dataclass(frozen=True)
class Template:
    """One conversation template of the original (a ``Conversation`` without its messages).

    Args:
        name: the key in the original ``conv_templates``.
        system: the default system prompt (text only; see ``system_format``).
        roles: (user role, assistant role) as the original spells them.
        style: the separator style.
        sep / sep2: separators.
        system_format: how a non-empty system prompt is laid out; the original keeps e.g.
            ``"<|im_start|>system\\n"`` inside its MPT system strings, and LLAMA_2's ``wrap_sys``;
            CHATML's also ends with the ``sep + "\\n"`` its renderer adds after a non-empty system.
        stop: token strings that end a generation besides the tokenizer's EOS (the original's
            ``stop_token_ids`` / the token that closes an answer; see :func:`stop_ids`).
    """

    name: str
    system: str
    roles: tuple[str, str]
    style: Style
    sep: str
    sep2: str | None = None
    system_format: str = "{system}"
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.style is Style.LLAMA_2 and "[" in self.sep:
            raise TemplateError(f"template {self.name!r}: LLAMA_2 sep {self.sep!r} contains '['; the original's "
                                "ret.lstrip(sep) would then eat into '[INST]'", hint="use a sep without '['")

    @property
    def full_system(self) -> str:
        """The system string exactly as the original ``Conversation.system`` holds it."""
        return self.system_block(self.system)

    def system_block(self, system: str) -> str:
        return self.system_format.replace("{system}", system) if system else ""


_LLAMA_2_SYSTEM = "<<SYS>>\n{system}\n<</SYS>>\n\n"
_USER_ASSISTANT = ("USER", "ASSISTANT")
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_CHATML_SYSTEM = "<|im_start|>system\n{system}"
_QWEN_ROLES = ("<|im_start|>user", "<|im_start|>assistant")
_QWEN_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_LLAVA_LLAMA_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                       "that the user provides, and assist the user with a variety of tasks using natural language.")
_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")

_CANONICAL = [
    Template("vicuna_v1", "A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.",
             _USER_ASSISTANT, Style.TWO, " ", "</s>"),
    Template("llava_v1", _HUMAN_SYSTEM, _USER_ASSISTANT, Style.TWO, " ", "</s>"),
    Template("llava_llama_2", _LLAVA_LLAMA_SYSTEM, _USER_ASSISTANT, Style.LLAMA_2, "<s>", "</s>", _LLAMA_2_SYSTEM),
    # (sic) two spaces after "while being safe." in the original
    Template("llama_2", "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
             "possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
             "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
             "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain "
             "why instead of answering something not correct. If you don't know the answer to a question, please "
             "don't share false information.", _USER_ASSISTANT, Style.LLAMA_2, "<s>", "</s>", _LLAMA_2_SYSTEM),
    Template("mistral_instruct", "", _USER_ASSISTANT, Style.LLAMA_2, "", "</s>", _LLAMA_2_SYSTEM),
    Template("chatml_direct", "Answer the questions.", _CHATML_ROLES, Style.MPT, "<|im_end|>",
             system_format=_CHATML_SYSTEM),
    Template("mpt", "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and "
             "honest answers.", _CHATML_ROLES, Style.MPT, "<|im_end|>", system_format=_CHATML_SYSTEM),
    Template("plain", "", ("", ""), Style.PLAIN, "\n"),
    Template("llava_v0", _HUMAN_SYSTEM, ("Human", "Assistant"), Style.SINGLE, "###"),
    # LLaVA-NeXT repository (LLaVA-VL/LLaVA-NeXT llava/conversation.py: conv_qwen, conv_qwen_2_5,
    # conv_llava_llama_3). The qwen ones list no stop token: generation ends at the tokenizer's EOS, which
    # the OneVision / Qwen2-Instruct tokenizers name <|im_end|>; a base Qwen tokenizer (EOS <|endoftext|>)
    # would run past the turn's end, so <|im_end|> stops here too. llava_llama_3: stop_token_ids=[128009].
    Template("qwen_1_5", "You are a helpful assistant.", _QWEN_ROLES, Style.CHATML, "<|im_end|>",
             system_format=_QWEN_SYSTEM, stop=("<|im_end|>",)),
    Template("qwen_2_5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", _QWEN_ROLES,
             Style.CHATML, "<|im_end|>", system_format=_QWEN_SYSTEM, stop=("<|im_end|>",)),
    Template("llava_llama_3", _LLAVA_LLAMA_SYSTEM, ("user", "assistant"), Style.LLAMA_3, "<|eot_id|>",
             stop=("<|eot_id|>",)),
]
ALIASES: dict[str, str] = {"v1": "vicuna_v1", "mistral_direct": "chatml_direct", "v0_plain": "plain",
                           "qwen_2": "qwen_1_5"}
TEMPLATES: dict[str, Template] = {t.name: t for t in _CANONICAL}
TEMPLATES.update({alias: TEMPLATES[target] for alias, target in ALIASES.items()})


def get_template(template: str | Template) -> Template:
    """The :class:`Template` for a name or alias (a Template is returned as is)."""
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise TemplateError(f"unknown conversation template {template!r}",
                            hint=f"use one of: {', '.join(sorted(TEMPLATES))}") from None


def stop_ids(template: str | Template, vocab) -> frozenset[int]:
    """The ids that end a generation with ``template``: the vocabulary's (``Vocab.eos_ids``) and the template's
    ``stop`` tokens.

    Raises:
        TemplateError: a stop token the vocabulary does not have (the template is not this model's).
    """
    tpl = get_template(template)
    ids = set(vocab.eos_ids)
    for token in tpl.stop:
        index = vocab.token_id(token)
        if index is None or index == vocab.unk_id or vocab.token(index) != token:
            raise TemplateError(f"template {tpl.name!r} ends answers with {token!r}, which the tokenizer in "
                                f"{vocab.folder} does not have", hint="pick the model's own template (--template)")
        ids.add(index)
    return frozenset(ids)


def with_image(text: str, n_images: int = 1) -> str:
    """``"<image>\\n" * n_images + text``: where the original cli puts the image of a first turn."""
    return f"{IMAGE_TOKEN}\n" * n_images + text


_FIELD = re.compile(r"\{(system|sep|sep2|user|assistant|msg)\}")


def _fill(fmt: str, template: Template, system: str, msg: str) -> str:
    values = {"system": template.system_block(system), "sep": template.sep, "sep2": template.sep2 or "",
              "user": template.roles[0], "assistant": template.roles[1], "msg": msg}
    return _FIELD.sub(lambda m: values[m.group(1)], fmt)


def _split_system(messages: Sequence[tuple[str, str | None]], template: Template):
    if messages and messages[0][0] == "system":
        return messages[0][1] or "", list(messages[1:])
    return template.system, list(messages)


def render(template: str | Template, messages: Sequence[tuple[str, str | None]]) -> str:
    """The prompt the original ``Conversation.get_prompt()`` builds for these messages.

    Args:
        template: a template name / alias from :data:`TEMPLATES`, or a :class:`Template`.
        messages: ``(role, text)`` pairs alternating "user" / "assistant", starting with "user",
            optionally preceded by one ("system", text) that replaces the system prompt;
            ``text=None`` is an open turn (end with ``("assistant", None)`` for a generation prompt).

    Raises:
        TemplateError: unknown template, roles out of order, or a turn the original cannot render.
    """
    tpl = get_template(template)
    fmt = STYLES[tpl.style]
    system, turns = _split_system(messages, tpl)
    shift = len(messages) - len(turns)  # error messages count the system message too
    trim = str.strip if fmt.trim else str
    system = trim(system)
    out = [_fill(fmt.start, tpl, system, "")]
    for i, (role, text) in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if role != expected:
            raise TemplateError(f"message {i + shift} of template {tpl.name!r} has role {role!r}, expected {expected!r}",
                                hint="alternate user/assistant turns, starting with user (system only first)")
        if role == "user":
            piece = (fmt.first_user_open if i == 0 else fmt.user_open) if not text else (
                fmt.first_user if i == 0 else fmt.user)
        else:
            piece = fmt.assistant_open if not text else fmt.assistant
        if piece is None:
            what = "an empty first user message" if role == "user" else "an answered assistant turn"
            raise TemplateError(f"template {tpl.name!r} ({tpl.style.value} style) cannot render {what} "
                                f"(message {i + shift}); the original fails there too",
                                hint="give the first user message text" if role == "user" else
                                "plain is a prompt-only format: end the conversation with ('assistant', None)")
        out.append(_fill(piece, tpl, system, trim(text or "")))
    out.append(_fill(fmt.end, tpl, system, ""))
    return "".join(out)


# --------------------------------------------------------------------------- Jinja chat template
# What the chat template emits for each {"type": "image"} item. The original tokenises the text
# around "<image>" chunk by chunk (tokenizer_image_token), so the chunk after an image starts a
# fresh SentencePiece encoding and gets the "▁" prefix: "<image>\n" -> [-200, 29871 "▁", 13 "\n"].
# transformers tokenises the whole prompt in ONE call, with "<image>" as a special token:
# - legacy tokenizers (Metaspace prepend_scheme "always") prefix every piece after a special
#   token with "▁", so "<image>\n" already gives [32000, 29871, 13];
# - non-legacy tokenizers (prepend_scheme "first") prefix only the start of the text, so
#   "<image>\n" would give [32000, 13]. A space written after "<image>" becomes that "▁":
#   "<image> \n" gives [32000, 29871, 13], the original's ids.
# The space is only right when text follows the image, which the "<image>\n" layout guarantees.
# BOS is NOT emitted: the tokenizer adds it (add_special_tokens=True, as LlavaProcessor does when
# the prompt does not start with BOS). Writing "<s>" into the text would change the next ids
# for a non-legacy tokenizer ("<s>A" -> [1, "A"], not [1, "▁A"]).
IMAGE_TEXT = {True: f"{IMAGE_TOKEN}\n", False: f"{IMAGE_TOKEN} \n"}  # keyed by legacy_tokenizer
# A {"type": "video"} item (LLaVA-OneVision's processor: "<video>", expanded to the pooled frames' features) stands
# where the original puts its one "<image>" for all frames, after the message's images (byte-level BPE: no
# legacy fix needed, see above).
VIDEO_TEXT = "<video>\n"


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a valid Jinja string literal


def _jinja_expr(fmt: str | None, template: Template, error: str, msg: str = "text") -> str:
    """One format string of STYLES as a Jinja ``{{ ... }}`` over ``system_block`` and ``msg``."""
    if fmt is None:
        return "{{- raise_exception(" + _literal(error) + ") -}}"
    constants = {"sep": template.sep, "sep2": template.sep2 or "", "user": template.roles[0],
                 "assistant": template.roles[1]}
    parts = []
    for i, piece in enumerate(re.split(r"\{(system|msg)\}", fmt)):
        if i % 2:
            parts.append("system_block" if piece == "system" else msg)
        else:
            literal = re.sub(r"\{(sep|sep2|user|assistant)\}", lambda m: constants[m.group(1)], piece)
            parts.append(_literal(literal)) if literal else None
    return "{{- " + (" + ".join(parts) or '""') + " -}}"


def chat_template(template_name: str, *, legacy_tokenizer: bool) -> str:
    """A Jinja chat template for a converted model's processor that gives the original's token ids.

    Messages are in transformers' format (role "system" / "user" / "assistant"; content a string
    or a list of ``{"type": "image"}`` / ``{"type": "video"}`` / ``{"type": "text", "text": ...}`` items). Images
    come first in a message, one "<image>\\n" each, then one "<video>\\n" per video, then its texts joined by a
    space; a leading system message replaces the template's system prompt; ``add_generation_prompt`` opens the assistant
    turn. Tokenised in one call with BOS added by the tokenizer, the result equals
    ``tokenizer_image_token(render(...))`` with each -200 replaced by the ``<image>`` id (see
    ``IMAGE_TEXT`` for why non-legacy tokenizers need "<image> \\n").

    Args:
        template_name: a name or alias from :data:`TEMPLATES`.
        legacy_tokenizer: the ``legacy`` flag of the model's original ``tokenizer_config.json``.
    """
    tpl = get_template(template_name)
    fmt = STYLES[tpl.style]
    wrap_before, _, wrap_after = tpl.system_format.partition("{system}")
    image_text = IMAGE_TEXT[legacy_tokenizer]
    fix_image = "" if legacy_tokenizer else (
        " | replace(" + _literal(IMAGE_TEXT[True]) + ", " + _literal(image_text) + ")")
    no_first_user = f"template {tpl.name}: the first user message must not be empty"
    no_answer = f"template {tpl.name}: prompt-only format, end with add_generation_prompt"
    texts = "selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')"
    msg = "(text | trim)" if fmt.trim else "text"  # the open/answered test reads the untrimmed text, as render
    bos = f"; the text starts with {_L3_BOS} as well (the original's prompt does)" if _L3_BOS in fmt.start else ""
    return "".join([
        f"{{#- vlmkit: original LLaVA conversation '{tpl.name}' ({tpl.style.value} style), "
        f"{'legacy' if legacy_tokenizer else 'non-legacy'} tokenizer; BOS comes from the tokenizer{bos} -#}}\n",
        "{%- set ns = namespace(system=" + _literal(tpl.system) + ", first_user=true) -%}\n",
        "{%- set loop_messages = messages -%}\n",
        "{%- if messages and messages[0]['role'] == 'system' -%}\n",
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}\n",
        "{%- else -%}{%- set ns.system = messages[0]['content'] | " + texts + " -%}{%- endif -%}\n",
        "{%- set loop_messages = messages[1:] -%}\n",
        "{%- endif -%}\n",
        "{%- set ns.system = ns.system | trim -%}\n" if fmt.trim else "",
        "{%- set system_block = (" + _literal(wrap_before) + " + ns.system + " + _literal(wrap_after)
        + ") if ns.system else '' -%}\n",
        _jinja_expr(fmt.start, tpl, ""), "\n",
        "{%- for message in loop_messages -%}\n",
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}\n",
        "{%- else -%}{%- set text = " + _literal(IMAGE_TEXT[True])
        + " * (message['content'] | selectattr('type', 'equalto', 'image') | list | length)"
        + " + " + _literal(VIDEO_TEXT)
        + " * (message['content'] | selectattr('type', 'equalto', 'video') | list | length)"
        + " + (message['content'] | " + texts + ") -%}{%- endif -%}\n",
        "{%- set text = text" + fix_image + " -%}\n",
        "{%- if message['role'] == 'user' -%}\n",
        "{%- if not text and ns.first_user -%}", _jinja_expr(fmt.first_user_open, tpl, no_first_user), "\n",
        "{%- elif not text -%}", _jinja_expr(fmt.user_open, tpl, ""), "\n",
        "{%- elif ns.first_user -%}", _jinja_expr(fmt.first_user, tpl, "", msg), "\n",
        "{%- else -%}", _jinja_expr(fmt.user, tpl, "", msg), "{%- endif -%}\n",
        "{%- set ns.first_user = false -%}\n",
        "{%- elif message['role'] == 'assistant' -%}\n",
        "{%- if not text -%}", _jinja_expr(fmt.assistant_open, tpl, ""), "\n",
        "{%- else -%}", _jinja_expr(fmt.assistant, tpl, no_answer, msg), "{%- endif -%}\n",
        "{%- else -%}{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}\n",
        "{%- endif -%}\n",
        "{%- endfor -%}\n",
        _jinja_expr(fmt.end, tpl, "") + "\n" if fmt.end else "",
        "{%- if add_generation_prompt -%}", _jinja_expr(fmt.assistant_open, tpl, ""), "{%- endif -%}\n",
    ])


# vlmkit names the original template it wrote into a Jinja chat template with a comment line; the
# converter writes it first, but other tools may prepend text (a BOS line, an edited header), so it is
# found anywhere and spaced loosely
MARKER = re.compile(r"\{#\s*vlmkit template:\s*([\w.-]+)\s*#\}")


def marker(name: str) -> str:
    """The Jinja comment that names an original template in a chat template: ``{# vlmkit template: NAME #}``."""
    return f"{{# vlmkit template: {name} #}}"


def marked_name(text: str | None) -> str | None:
    """The original template a chat template names with :func:`marker`, or None (no marker, no text)."""
    found = MARKER.search(text or "")
    return found.group(1) if found else None


# Where a transformers folder keeps its chat template, in the order transformers 5 uses it:
# ProcessorMixin.get_processor_dict (processing_utils.py) takes processor_config.json's "chat_template"
# when it is set, else the legacy chat_template.json, else chat_template.jinja; a folder without a
# processor template is used through its tokenizer, where chat_template.jinja wins over
# tokenizer_config.json's "chat_template" (PreTrainedTokenizerBase._from_pretrained,
# tokenization_utils_base.py). vLLM asks the processor first, then the tokenizer: the same order.
TEMPLATE_FILES = ("processor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer_config.json")


def read_chat_template(folder: Path) -> str | None:
    """The chat template a transformers folder carries (the first of :data:`TEMPLATE_FILES` that holds one:
    the ``.jinja`` text, or a JSON file's ``chat_template`` string), or None; an unreadable file counts as
    no template."""
    for name in TEMPLATE_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            template = text if name.endswith(".jinja") else json.loads(text).get("chat_template")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(template, str):
            return template
    return None


def write_chat_template(folder: Path, template: str) -> None:
    """Write ``template`` where transformers 5 saves a processor's chat template (``chat_template.jinja``)."""
    (Path(folder) / "chat_template.jinja").write_text(template, encoding="utf-8")
