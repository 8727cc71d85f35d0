from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from vlmkit.families.llava import tiny

FIXTURES = Path(__file__).parent / "fixtures"
T = TypeVar("T")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``--dist loadgroup`` sends the tests of one ``xdist_group`` to one worker by naming them ``ID@GROUP``.
    pytest-xdist 3.8 sets that name on ``item._nodeid``, which pytest 9 no longer reads (an item's id is
    ``item._id``): every group was ignored, its tests spread over both workers (two vLLMs or two Rays at once,
    module fixtures set up on each). The same name, set where pytest 9 reads it; nothing once xdist sets it."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup only
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = type(item._id).parse(item.nodeid + suffix)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _vlmkit_cache(tmp_path_factory):
    """Conversions cache their source hashes under VLMKIT_CACHE: the tests' own, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLMKIT_CACHE", str(tmp_path_factory.mktemp("vlmkit-cache")))
    yield
    mp.undo()


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str) -> CliResult:
    """Run ``vlmkit ARGS`` in-process and capture what a user would see."""
    from vlmkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``vlmkit ARGS`` as a separate process (for limits and signals)."""
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


@pytest.fixture
def cli():
    return run_cli


def built_once(tmp_path_factory, name: str, build: Callable[[Path], T]) -> T:
    """``build(folder)``, run once per test run whatever the number of xdist workers: the first worker to ask
    builds under a folder of the run's base temp folder (which every worker shares), the others wait for it and
    get the same value. ``build`` writes only under ``folder`` and returns plain data (paths, strings, numbers,
    lists, tuples, dicts), handed between workers as JSON; what it built is read-only for the tests (copy a file
    before changing it)."""
    base = tmp_path_factory.getbasetemp()
    # xdist gives each worker base/../popen-gwN: their parent is this run's; without xdist, base is
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    done = shared / f"built-{name}.json"
    with open(shared / f"built-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder = shared / f"built-{name}"
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
            folder.mkdir()
            part = done.with_suffix(".part")
            part.write_text(json.dumps(_tagged(build(folder))))
            part.replace(done)
    return _untagged(json.loads(done.read_text()))


def _tagged(value):
    """``value`` as JSON can hold it: a path or a tuple tagged, so that ``_untagged`` gives them back."""
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_tagged(v) for v in value]}
    if isinstance(value, list):
        return [_tagged(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):  # JSON would turn other keys to text
        return {k: _tagged(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"built_once: a build returned a {type(value).__name__}; return paths and plain data")


def _untagged(value):
    if isinstance(value, list):
        return [_untagged(v) for v in value]
    if isinstance(value, dict):
        if value.keys() == {"__path__"}:
            return Path(value["__path__"])
        if value.keys() == {"__tuple__"}:
            return tuple(_untagged(v) for v in value["__tuple__"])
        return {k: _untagged(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny LLaVA models: originals (1.5, NeXT-Mistral) and their conversions, built once per run."""
    def build(root: Path) -> dict:
        clip = tiny.make_clip(root / "clip-vit-tiny")
        out = {"clip": clip, "v15": tiny.make_llava15(root / "llava-v1.5-tiny", clip),
               "next": tiny.make_llava_next(root / "llava-v1.6-mistral-tiny", clip)}
        for name, extra in (("v15", []), ("next", ["--vision-tower", str(clip)])):
            dst = root / f"{name}-hf"
            assert run_cli("convert", out[name], dst, "--quiet", *extra).code == 0
            out[f"{name}-hf"] = dst
        return out

    return built_once(tmp_path_factory, "models", build)


@pytest.fixture(scope="session")
def blip2_t5(tmp_path_factory):
    """A tiny BLIP-2 Flan-T5 as LAVIS releases it (release .pth, eva_vit_g.pth, Flan-T5 folder) and its conversion.

    ``options``: the loading arguments the LAVIS parts need (``vlmkit.load`` keywords; ``args``: the CLI flags).
    """
    import json

    from vlmkit.families.blip2 import tiny as blip2_tiny

    root = tmp_path_factory.mktemp("blip2-t5")
    sizes = blip2_tiny.TinySizes()
    heads = root / "heads.json"
    heads.write_text(json.dumps(sizes.override()))
    out = {"lavis": blip2_tiny.make_release(root / "lavis" / "blip2_pretrained_flant5xl.pth", "t5", sizes),
           "eva": blip2_tiny.make_eva_vit(root / "eva" / "eva_vit_g.pth", sizes),
           "t5": blip2_tiny.make_language_model(root / "flan-t5-tiny", "t5", sizes)}
    out["args"] = ["--vision", out["eva"], "--language-model", out["t5"], "--config", heads]
    out["options"] = {"vision_tower": str(out["eva"]), "model_base": str(out["t5"]), "config": sizes.override()}
    out["hf"] = root / "blip2-flan-t5-hf"
    r = run_cli("convert", out["lavis"], out["hf"], "--quiet", *out["args"])
    assert r.code == 0, r.err
    return out


TRANSFORMERS_LAYOUTS = ("loaded", "built", "modules")


def save_with_transformers(folder: Path, dst: Path, how: str) -> Path:
    """``folder`` loaded and saved again by transformers' own ``save_pretrained`` (model and processor), as a
    user who fine-tunes with transformers 5 gets it. transformers 5.25 writes, by ``how``:

    * ``loaded``: ``from_pretrained`` then ``save_pretrained``: the published names again;
    * ``built``: a model built from its config given the weights (as training scripts and accelerate's
      empty-weight loading do): the CLIP tower without ``vision_model.`` (``vision_tower.encoder.*``);
    * ``modules``: ``save_pretrained(save_original_format=False)`` (also a model with a PEFT adapter):
      the module names (``model.language_model.*``, ``lm_head.weight``, ``model.vision_tower.*``, ...).

    No ``tokenizer.model`` and no ``preprocessor_config.json``: transformers 5 writes neither.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder)
    if how == "built":
        built = type(model)(AutoConfig.from_pretrained(folder))
        built.load_state_dict(model.state_dict())
        built.save_pretrained(dst)
    else:
        model.save_pretrained(dst, save_original_format=how != "modules")
    AutoProcessor.from_pretrained(folder).save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def bpe_vocabs(tmp_path_factory):
    """``(folders, ids)``: the Qwen2 and Llama-3 tokenizer folders rebuilt from llama.cpp's vocab-only GGUF files
    (``bpe_tokenizers.bpe_folders``: each one's ``{token text: id}`` read from the GGUF) and GPT-2's folder
    (``folders["gpt2"]``), built once per run. Read-only: copy a folder before changing it."""
    from .bpe_tokenizers import bpe_folders, gpt2_folder

    def build(root: Path):
        folders, ids = bpe_folders(root)
        return {**folders, "gpt2": gpt2_folder(root / "gpt2")}, ids

    return built_once(tmp_path_factory, "bpe-vocabs", build)


def tiny_release(tmp_path_factory, family, variant: str) -> dict:
    """The registry's tiny ``variant`` of ``family`` (``family.make_tiny``: the layout its release leaves) with its
    loading options (``family.tiny_options``), built once per run: ``{"path", "options"}``. Read-only."""
    def build(root: Path) -> dict:
        return {"path": family.make_tiny(root, variant), "options": family.tiny_options(root, variant)}

    return built_once(tmp_path_factory, f"tiny-{family.NAME}-{variant}", build)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """``tiny_llava(variant)``: the tiny LLaVA ``variant`` (``tiny_release``; the same folder the registry walk
    walks) as a user has it: ``path``, ``options``, ``flags`` (those options as ``vlmkit`` flags: a tower no file
    describes gets ``heads``, a --config file stating its values), and ``converted()``: its ``vlmkit convert
    PATH DST --quiet FLAGS`` folder (``convert_err``: what that command printed on stderr), built once per run on
    first use. Everything is read-only for the tests (copy before changing)."""
    import json

    from vlmkit import families

    llava = families.load("llava")

    def flags(root: Path, options: dict) -> tuple[Path | None, list]:
        heads, out = None, []
        if "config" in options:
            heads = root / "heads.json"
            heads.write_text(json.dumps(options["config"]))
            out += ["--config", heads]
        if "model_base" in options:
            out += ["--model-base", options["model_base"]]
        return heads, out

    class Tiny(dict):
        def converted(self) -> Path:
            return self.conversion()["converted"]

        def conversion(self) -> dict:
            def build(root: Path) -> dict:
                r = run_cli("convert", self["path"], root / "hf", "--quiet", *self["flags"])
                assert r.code == 0, r.err
                return {"converted": root / "hf", "convert_err": r.err}

            return built_once(tmp_path_factory, f"tiny-llava-{self['variant']}-hf", build)

    def get(variant: str) -> Tiny:
        built = tiny_release(tmp_path_factory, llava, variant)
        heads, cli_flags = built_once(tmp_path_factory, f"tiny-llava-{variant}-flags",
                                      lambda root: flags(root, built["options"]))
        return Tiny(built, variant=variant, heads=heads, flags=cli_flags)

    return get


@pytest.fixture(scope="session")
def tiny_instructblip(tmp_path_factory):
    """``{"vicuna": parts, "t5": parts}``: a tiny InstructBLIP release of each language model as LAVIS leaves it
    (``instructblip.tiny.tiny``: release, eva, language_model, config), its loading ``flags`` and its ``vlmkit
    convert RELEASE OUT --quiet FLAGS`` (``out``; ``summary``: what it printed on stderr), built once per run.
    Read-only: copy before changing."""
    from vlmkit.families.instructblip import tiny as instructblip_tiny

    def build(root: Path) -> dict:
        built = {}
        for variant in ("vicuna", "t5"):
            parts = instructblip_tiny.tiny(root / variant, variant)
            flags = ["--vision", parts["eva"], "--language-model", parts["language_model"], "--config",
                     parts["config"]]
            out = root / variant / "hf"
            r = run_cli("convert", parts["release"], out, "--quiet", *flags)
            assert r.code == 0, r.err
            built[variant] = {**parts, "flags": flags, "out": out, "summary": r.err}
        return built

    return built_once(tmp_path_factory, "instructblip", build)
