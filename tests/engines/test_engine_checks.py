"""What vlmkit checks and decides before an engine starts: folders, GGUF templates, command lines, flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.options import LoadOptions
from vlmkit.runtime import templates
from vlmkit.serve.app import ServeSettings
from vlmkit.serve.engines import NAMES, check_flags
from vlmkit.serve.engines import llamacpp, vllm
from vlmkit.serve.engines.front import EngineError

from ..conftest import TRANSFORMERS_LAYOUTS, run_cli, save_with_transformers


def copy(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


def test_vlmkit_folders_are_what_vllm_takes(models):
    config = vllm.check_folder(models["v15-hf"])
    assert config["text_config"]["head_dim"] >= vllm.MIN_CPU_HEAD_DIM
    assert "bos_token" not in templates.read_chat_template(models["v15-hf"])  # so requests ask vLLM to add BOS


def test_vllm_refusals_name_the_field_and_the_fix(models, tmp_path):
    no_template = copy(models["v15-hf"], tmp_path, "no-template")
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="no chat template") as e:
        vllm.check_folder(no_template)
    assert "vlmkit convert" in e.value.hint

    other_model = copy(models["v15-hf"], tmp_path, "other-model")  # names no Llava layout has
    (other_model / "model.safetensors").unlink()
    save_file({"transformer.wte.weight": torch.zeros(2, 2)}, other_model / "model.safetensors")
    with pytest.raises(ConfigError, match="'transformer.wte.weight'.*no layout transformers writes for Llava"):
        vllm.check_folder(other_model)

    mixed = copy(models["v15-hf"], tmp_path, "mixed")  # one tensor under two layouts' names
    (mixed / "model.safetensors").unlink()
    save_file({"lm_head.weight": torch.zeros(2, 2), "language_model.lm_head.weight": torch.zeros(2, 2)},
              mixed / "model.safetensors")
    with pytest.raises(CheckpointError, match="are both 'language_model.lm_head.weight'.*mixes two layouts"):
        vllm.check_folder(mixed)

    small_heads = copy(models["v15-hf"], tmp_path, "small-heads")
    config = json.loads((small_heads / "config.json").read_text())
    config["text_config"]["head_dim"] = 16
    (small_heads / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="text_config.head_dim is 16.*>= 32"):
        vllm.check_folder(small_heads)
    vllm.check_folder(small_heads, device="cuda")  # only the CPU attention has the limit

    with pytest.raises(ConfigError, match="no config.json"):
        vllm.check_folder(models["v15"].parent / "clip-vit-tiny" / "nowhere")


def test_vllm_refuses_a_family_without_a_vllm_view_naming_those_with_one(tmp_path):
    """The families vLLM is handed are those whose forms have the registry's vllm_view capability."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"]}))
    with pytest.raises(ConfigError, match=r"architectures is \['CLIPModel'\]; vlmkit hands vLLM the transformers "
                                          r"folders of llava models") as e:
        vllm.check_folder(tmp_path)
    assert "--engine vlmkit" in e.value.hint


def _tensors(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _files(folder) -> dict:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


@pytest.mark.parametrize("name", ["v15", "next"])
@pytest.mark.parametrize("how", TRANSFORMERS_LAYOUTS)
def test_vllm_gets_every_transformers_layout_in_published_names(models, tmp_path, name, how):
    """A folder saved by transformers 5 is served, not refused: vLLM gets a copy in the published names
    (the tensors of the folder vlmkit wrote, unchanged), beside the folder's own other files."""
    published = models[f"{name}-hf"]
    saved = save_with_transformers(published, tmp_path / f"{name}-{how}", how)
    before = _files(saved)
    vllm.check_folder(saved)
    view = vllm.published_view(saved)
    try:
        if how == "loaded":  # transformers wrote the published names again: nothing to rewrite
            assert view is None
            return
        assert view is not None and not view.is_relative_to(saved)
        ours, reference = _tensors(view), _tensors(published)
        assert sorted(ours) == sorted(reference)
        assert all(torch.equal(ours[k], reference[k]) for k in reference)
        for file in ("config.json", "chat_template.jinja", "tokenizer.json", "processor_config.json"):
            assert (view / file).read_bytes() == (saved / file).read_bytes()
        assert not (view / "vlmkit-manifest.json").exists()  # an internal copy: no manifest, no source hashing
        vllm.check_folder(view)
        assert vllm.published_view(view) is None
        assert _files(saved) == before  # the user's folder is untouched
    finally:
        if view is not None:
            shutil.rmtree(view.parent)


def test_vllm_is_started_on_the_view_which_goes_with_it(models, tmp_path, monkeypatch, capsys):
    saved = save_with_transformers(models["v15-hf"], tmp_path / "built", "built")
    monkeypatch.setattr(vllm, "python", lambda: shutil.which("true"))  # a "vLLM" that exits at once
    process, _ = vllm.start(str(saved), ServeSettings(model_name="tiny"), LoadOptions())
    served = Path(process.argv[process.argv.index("--model") + 1])
    assert served != saved and served.name == saved.name and (served / "model.safetensors").is_file()
    assert f"vLLM gets a renamed copy in {served}" in capsys.readouterr().err
    process.stop()
    assert not served.parent.exists()


@pytest.mark.parametrize("failing", ["free_port", "EngineProcess"])
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failure_after_the_view_is_made_leaves_no_copy(models, tmp_path, monkeypatch, failing, error):
    """The renamed copy is model-sized, often in RAM ($TMPDIR on tmpfs): an error or Ctrl-C before vLLM starts
    removes it."""
    import tempfile

    saved = save_with_transformers(models["v15-hf"], tmp_path / "built", "built")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setattr(vllm, "python", lambda: shutil.which("true"))
    made = []
    view = vllm.published_view
    monkeypatch.setattr(vllm, "published_view", lambda folder: made.append(view(folder)) or made[-1])

    def fail(*args, **kwargs):
        raise error("injected")

    monkeypatch.setattr(vllm, failing, fail)
    with pytest.raises(error, match="injected"):
        vllm.start(str(saved), ServeSettings(model_name="tiny"), LoadOptions())
    assert made and made[0] is not None and made[0].is_relative_to(temporary)  # the view was made, then removed
    assert list(temporary.iterdir()) == []


def test_vllm_command_line(models):
    settings = ServeSettings(model_name="tiny", max_batch_size=4, max_images=2)
    config = vllm.check_folder(models["v15-hf"])
    argv = vllm.command("py", models["v15-hf"], 9999, "tiny", settings, LoadOptions(), config, data_parallel_size=2)
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]  # not the `vllm` CLI
    text = " ".join(argv)
    for part in ("--enforce-eager", "--max-num-seqs 4", '--limit-mm-per-prompt {"image": 2}', "--dtype float32",
                 "--data-parallel-size 2", "--host 127.0.0.1", "--served-model-name tiny"):
        assert part in text, part
    on_gpu = vllm.command("py", models["v15-hf"], 1, "t", settings, LoadOptions(device="cuda:1"), config)
    assert "--enforce-eager" not in on_gpu and on_gpu[on_gpu.index("--device-ids") + 1] == "1"


def test_vllm_python_is_found_or_the_error_says_how(monkeypatch, tmp_path):
    monkeypatch.setenv(vllm.PYTHON_ENV, "/opt/vllm/bin/python")
    assert vllm.python() == "/opt/vllm/bin/python"
    monkeypatch.delenv(vllm.PYTHON_ENV)
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(EngineError, match="vLLM is not installed") as e:
        vllm.python()
    assert "make vllm" in e.value.hint


def test_gguf_prompt_is_the_original_template(gguf_folder):
    model, mmproj = llamacpp.gguf_pair(gguf_folder, None)
    assert mmproj.name.startswith("mmproj-")
    chat = llamacpp.GGUFChat(model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What?", "images": [b""]},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}]
    original = templates.render("llava_v1", [("system", "Be brief."), ("user", templates.with_image("What?")),
                                             ("assistant", "A cat."), ("user", "Sure?"), ("assistant", None)])
    assert chat.render(messages, "<M>") == original.replace(templates.IMAGE_TOKEN, "<M>")
    assert chat.render(messages).count(llamacpp.DEFAULT_MARKER) == 1


def test_llamacpp_command_line_gives_every_slot_the_whole_context(gguf_folder):
    model, mmproj = llamacpp.gguf_pair(gguf_folder, None)
    chat = llamacpp.GGUFChat(model)
    argv = llamacpp.command("llama-server", model, mmproj, 9999, ServeSettings(model_name="t", max_batch_size=4), chat)
    text = " ".join(argv)
    assert f"-np 4 -c {4 * chat.context_length}" in text and "--mmproj" in text and "--metrics" in text
    assert "--rpc" not in argv
    rpc = llamacpp.command("llama-server", model, mmproj, 9999, ServeSettings(model_name="t"), chat,
                           "h1:50052,h2:50052")
    assert rpc[rpc.index("--rpc") + 1] == "h1:50052,h2:50052"


def test_gguf_pair_errors(gguf_folder, tmp_path):
    model, _ = llamacpp.gguf_pair(gguf_folder, None)
    with pytest.raises(ConfigError, match="no --mmproj"):
        llamacpp.gguf_pair(model, None)
    with pytest.raises(ConfigError, match="serves a GGUF file"):
        llamacpp.gguf_pair(tmp_path / "model.safetensors", None)
    with pytest.raises(ConfigError, match="no such file"):
        llamacpp.gguf_pair(model, tmp_path / "missing.gguf")


@pytest.mark.parametrize("flags, words", [
    (["--engine", "vllm", "--replicas", "2"], "--data-parallel-size"),
    (["--engine", "llama.cpp", "--ray-address", "h:6379"], "--ray-address"),
    (["--data-parallel-size", "2"], "passed to vLLM"),
    (["--mmproj", "m.gguf"], "llama.cpp"),
    (["--num-gpus-per-replica", "1"], "--replicas N"),
    (["--rpc", "h:50052"], "rpc-server"),
])
def test_flags_that_do_not_apply_are_refused(flags, words):
    result = run_cli("serve", "model/", *flags)
    assert result.code == 1 and words in result.err, result.err


def test_cli_engine_choices_are_the_engines():
    from vlmkit.cli import build_parser

    serve = next(a for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
                 if a.dest == "engine")
    assert tuple(serve.choices) == NAMES


def test_check_flags_accepts_the_defaults():
    from vlmkit.cli import build_parser

    check_flags(build_parser().parse_args(["serve", "m/"]))


def test_gguf_prompt_gives_llama_cpp_the_original_ids(gguf_folder, reference):
    """Around the image, llama.cpp's ids of the rendered prompt are the runtime's (the original's)."""
    from vlmkit.parity.llamacpp import LlamaCpp
    from vlmkit.runtime.messages import normalise

    from .conftest import CAT

    model, mmproj = llamacpp.gguf_pair(gguf_folder, None)
    messages = [{"role": "user", "content": "What is this?", "images": [CAT]}]
    with LlamaCpp(model, mmproj, n_ctx=512) as llm:
        chunks = llm.tokenize(llamacpp.GGUFChat(model).render(messages), [CAT])
    ids = [i for c in chunks for i in (c.ids if c.kind == "text" else [-1])]
    original = reference.backend.prompt_ids(normalise(messages))
    marker = reference.backend.marker
    assert ids == [-1 if i == marker else i for i in original]
