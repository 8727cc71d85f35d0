"""``vlmkit serve GGUF --mmproj MMPROJ --engine llama.cpp``: llama.cpp's own ``llama-server`` behind vlmkit's front.

Why ``llama-server`` and not llama-cpp-python's bundled server (measured with 0.3.36; the
README has the figures): the bundled server answers one request at a time, reads ``file://``
URLs from its own disk, answers a broken image with 500 and builds LLaVA prompts with its
own template. ``llama-server`` (built by ``make llama-server`` from the very llama.cpp source
of the installed llama-cpp-python) decodes its slots together. vlmkit keeps the front:

* the request is validated, its images fetched under the media policy and checked, by the
  same code as ``--engine vlmkit`` (a broken image or a ``file://`` URL is a 400 from vlmkit;
  llama-server never reads a URL);
* the prompt is the original conversation template, rendered here with llama.cpp's media
  marker for each image and sent to ``POST /completion`` with the images: the same prompt as
  llama.cpp called directly (``parity.llamacpp.LlamaCpp.generate``) and as ``vlmkit verify``
  checks. vlmkit's GGUFs name their template (``{# vlmkit template: NAME #}`` in
  ``tokenizer.chat_template``); it is rendered by ``runtime.templates`` with ``<image>\n``, the
  original's text, which llama.cpp tokenises chunk by chunk as the original does. The Jinja
  text itself is written for transformers' one-call tokenisation (``<image> \n``), which gives
  llama.cpp a wrong id after the image (259 "▁▁" instead of 29871 "▁"). A GGUF from elsewhere
  has its Jinja template rendered as is;
* sampling is OpenAI's: only ``top_p`` and ``temperature`` (0 = greedy), no top-k / min-p;
* ``--max-batch-size`` is the number of slots, and each slot gets the model's whole training
  context (``-c`` = slots x context): with less, concurrent image requests fail ("failed to find
  a memory slot").
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from functools import cached_property
from pathlib import Path
from typing import AsyncIterator

from ...conversion import gguf_folder
from ...errors import ConfigError
from ...runtime.generation import SamplingParams
from ...runtime import templates
from ...runtime.templates import IMAGE_TOKEN
from .front import EngineFailed, EngineReply, image_payload, refusal
from .openai_backend import EngineServer, LeadingSpace, error_message
from .process import EngineProcess, free_port

NAME = "llama.cpp"
SERVER_ENV = "VLMKIT_LLAMA_SERVER"
BUILD_HINT = ("make llama-server   (builds llama.cpp once from the llama-cpp-python source vlmkit pins: llama-cpp-python, "
              f"and llama-server into .venv/bin), or point {SERVER_ENV} at a llama-server binary")
START_TIMEOUT = 300.0
DEFAULT_MARKER = "<__media__>"  # mtmd_default_marker(); llama-server draws its own (GET /props: media_marker)
STB_FORMATS = ("PNG", "JPEG", "BMP", "GIF")  # what llama.cpp decodes; others are sent as PNG
FINISH = {"limit": "length"}  # llama-server's stop_type -> OpenAI's finish_reason (eos, word -> "stop")
# file types whose weight repacking crashes this llama.cpp on CPUs with AMX (see parity/llamacpp.py)
NO_REPACK = {7}  # general.file_type 7 = MOSTLY_Q8_0


def server_binary() -> str:
    """``$VLMKIT_LLAMA_SERVER``, else ``llama-server`` beside this Python (``make llama-server``), else on PATH."""
    if os.environ.get(SERVER_ENV):
        return os.environ[SERVER_ENV]
    beside = Path(sys.executable).parent / "llama-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("llama-server")
    if found:
        return found
    from .front import EngineError

    raise EngineError("llama.cpp's llama-server is not installed (not beside this Python, not on PATH, "
                      f"{SERVER_ENV} not set)", hint=BUILD_HINT)


def gguf_pair(model: str | Path, mmproj: str | Path | None) -> tuple[Path, Path]:
    """(language model, mmproj): a folder written by ``vlmkit convert --to gguf``, or a file and ``--mmproj``."""
    model = Path(model)
    if model.is_dir():
        pair = gguf_folder.gguf_pair(model)
        return pair if mmproj is None else (pair[0], Path(mmproj))
    if model.suffix != ".gguf" or not model.is_file():
        raise ConfigError(f"{model}: --engine llama.cpp serves a GGUF file (or a folder from "
                          "`vlmkit convert X out/ --to gguf`)", hint="vlmkit convert MODEL out/ --to gguf")
    if mmproj is None:
        raise ConfigError(f"{model}: no --mmproj; llama.cpp needs the vision tower's mmproj-*.gguf to see images",
                          hint=f"vlmkit serve {model} --mmproj mmproj-....gguf --engine llama.cpp")
    if not Path(mmproj).is_file():
        raise ConfigError(f"--mmproj {mmproj}: no such file")
    return model, Path(mmproj)


class GGUFChat:
    """The chat template and limits a language-model GGUF carries (read from its header only)."""

    def __init__(self, path: Path):
        import gguf

        self.path = path
        fields = gguf.GGUFReader(path).fields
        value = lambda key, default=None: fields[key].contents() if key in fields else default  # noqa: E731
        self.template_source = value("tokenizer.chat_template")
        if not self.template_source:
            raise ConfigError(f"{path}: no tokenizer.chat_template; vlmkit builds the prompt from the GGUF's own "
                              "template (the original conversation template)",
                              hint="convert it with: vlmkit convert ORIGINAL out/ --to gguf")
        self.template_name = templates.marked_name(self.template_source)
        arch = value("general.architecture")
        self.context_length = int(value(f"{arch}.context_length", 2048))
        self.file_type = int(value("general.file_type", 1))
        eos = value("tokenizer.ggml.eos_token_id")
        tokens = fields.get("tokenizer.ggml.tokens")
        self.eos_token = tokens.contents(eos) if tokens is not None and eos is not None else "</s>"
        probe = self.render([{"role": "user", "content": "?", "images": [b""]}])
        if probe.count(DEFAULT_MARKER) != 1:
            raise ConfigError(f"{path}: its chat template does not place an image ({IMAGE_TOKEN}) where a message "
                              "has one", hint="convert it with: vlmkit convert ORIGINAL out/ --to gguf")

    @cached_property
    def template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template_source)

    def render(self, messages: list[dict], marker: str = DEFAULT_MARKER) -> str:
        """Runtime messages -> the prompt, one llama.cpp media ``marker`` per image (images first in a message).

        BOS is not rendered: llama.cpp adds it when it tokenises (``tokenizer.ggml.add_bos_token``).
        """
        if self.template_name:
            turns = [(m["role"], templates.with_image(m["content"], len(m["images"])) if m.get("images")
                      else m["content"]) for m in messages]
            return templates.render(self.template_name, turns + [("assistant", None)]).replace(IMAGE_TOKEN, marker)
        chat = []
        for m in messages:
            images = m.get("images") or []
            content = m["content"] if not images else ([{"type": "image"} for _ in images] +
                                                       [{"type": "text", "text": m["content"]}])
            chat.append({"role": m["role"], "content": content})
        text = self.template.render(messages=chat, add_generation_prompt=True, bos_token="",
                                    eos_token=self.eos_token)
        return text.replace(IMAGE_TOKEN, marker)


def command(binary: str, model: Path, mmproj: Path, port: int, settings, chat: GGUFChat,
            rpc: str | None = None) -> list[str]:
    """llama-server's command line: one slot per ``--max-batch-size``, each with the whole context;
    with ``rpc`` (``HOST:PORT,...``), the layers are spread over those llama.cpp ggml-rpc-servers."""
    slots = settings.max_batch_size
    argv = [binary, "-m", str(model), "--mmproj", str(mmproj), "--host", "127.0.0.1", "--port", str(port),
            "--alias", settings.model_name, "-np", str(slots), "-c", str(slots * chat.context_length),
            "--metrics", "--no-webui"]
    if chat.file_type in NO_REPACK:
        argv.append("--no-repack")
    if rpc:
        argv += ["--rpc", rpc]
    return argv


class CompletionBackend(EngineServer):
    """Streams llama-server's ``POST /completion`` with a rendered prompt and base64 images."""

    name = NAME

    def __init__(self, url: str, chat: GGUFChat, process=None):
        super().__init__(url, process)
        self.chat = chat
        self.marker: str | None = None  # llama-server's media marker, random per server (text cannot forge it)

    def body(self, messages: list[dict], params: SamplingParams) -> dict:
        images = [base64.b64encode(image_payload(i, STB_FORMATS)[1]).decode() for m in messages
                  for i in m.get("images") or []]
        prompt = self.chat.render(messages, self.marker or DEFAULT_MARKER)
        body = {"prompt": {"prompt_string": prompt, "multimodal_data": images} if images else prompt,
                "n_predict": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "samplers": ["top_p", "temperature"], "stream": True, "cache_prompt": True,
                "seed": params.seed if params.seed is not None else -1}
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    async def stream(self, messages: list[dict], params: SamplingParams, timeout: float) -> AsyncIterator[tuple]:
        strip, text, last = LeadingSpace(), [], None
        if self.marker is None:
            self.marker = (await self.client().get("/props")).json()["media_marker"]
        async with self.client().stream("POST", "/completion", json=self.body(messages, params)) as response:
            if response.status_code != 200:
                raise refusal(NAME, response.status_code, error_message(await response.aread()))
            yield "start", None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    if line.startswith("error:"):
                        raise EngineFailed(f"{NAME}: {error_message(line[6:].encode())}")
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise EngineFailed(f"{NAME}: {error_message(line[6:].encode())}")
                piece = strip(chunk.get("content") or "")
                if piece:
                    text.append(piece)
                    yield "delta", piece
                if chunk.get("stop"):
                    last = chunk
        if last is None:
            raise EngineFailed(f"{NAME} ended the stream before its last chunk")
        yield "done", EngineReply("".join(text), int(last.get("tokens_evaluated", 0)),
                                  int(last.get("tokens_predicted", 0)), FINISH.get(last.get("stop_type"), "stop"))


def start(model: str, settings, mmproj: str | None = None, rpc: str | None = None):
    """Check the GGUF pair, start llama-server on it; returns ``(EngineProcess, Backend)``."""
    model_file, mmproj_file = gguf_pair(model, mmproj)
    chat = GGUFChat(model_file)
    port = free_port()
    argv = command(server_binary(), model_file, mmproj_file, port, settings, chat, rpc)
    process = EngineProcess(NAME, argv, port).start()
    return process, CompletionBackend(process.url, chat, process)


def start_from_args(args, settings, options):
    """``start`` with ``vlmkit serve``'s arguments (``--dtype`` / ``--device`` are the GGUF's own)."""
    return start(str(args.model), settings, mmproj=args.mmproj, rpc=args.rpc)
