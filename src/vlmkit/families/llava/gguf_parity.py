"""``vlmkit verify ORIGINAL GGUF_FOLDER`` for LLaVA: the GGUF pair run in llama.cpp against the original model.

Judged (the verdict):

* files: every file matches the folder's manifest;
* prompt ids: llama.cpp's tokenizer (the GGUF vocabulary) gives the original's ids around the image;
* image embeddings: llama.cpp's embeddings of a square probe (no resampling on either side)
  against the original tower + projector, computed the way this llama.cpp build computes them;
* language model: fed llama.cpp's own image embeddings and prompt ids, the transformers
  language model (the exact target of the GGUF, from the same first-stage plan) and the GGUF
  in llama.cpp give the same greedy tokens, and logits within the type's bounds.

Reported, not judged: end to end, llama.cpp with its own preprocessing against the original
model (image embeddings, greedy tokens). They differ while llama.cpp has the defect
ggml-org/llama.cpp#25814 (its LLaVA graph appends the CLS embedding AFTER the patches, so
every patch gets its neighbour's position embedding, the first patch is dropped and the
projected CLS reaches the language model). No GGUF can compensate; ``detect_cls_defect`` runs
the original tower both ways and names the defect when llama.cpp matches the defective order.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ...conversion import output
from ...conversion.gguf_folder import gguf_pair
from ...conversion.gguf_sink import GGUF_TYPES
from ...errors import ConfigError, ManifestError
from ...options import LoadOptions
from ...parity import Check, Report, compare_ids, compare_tensors
from ...parity.llamacpp import DEFECT, LlamaCpp, Run, load_bindings
from ...runtime import images, templates
from ...runtime.tokens import IMAGE_TOKEN_INDEX
from .checkpoint import form_of, open_original
from .hf_output import template_for
from .reference import OriginalLlava


@dataclass(frozen=True)
class Bounds:
    logits: float  # max abs diff of the language model's logits
    logits_cosine: float
    embeddings: float  # max abs diff of the image embeddings
    embeddings_cosine: float


# Measured on the tiny models with margin; f32 differs only by llama.cpp's kernels (its GELU
# approximation in the projector), the others also by the weights' rounding.
BOUNDS = {
    "f32": Bounds(1e-3, 0.99999, 2e-2, 0.99999),
    "f16": Bounds(5e-2, 0.9999, 5e-2, 0.9999),
    "bf16": Bounds(2e-1, 0.999, 2e-1, 0.999),
    "q8_0": Bounds(5e-1, 0.998, 3e-1, 0.998),
}
LOOSE = Bounds(2.0, 0.99, 1.0, 0.98)  # q5 / q4: the language model checks are reported, not judged (see verify)


def type_of(path: Path) -> str:
    file_type = gguf.GGUFReader(path).fields["general.file_type"].contents()
    return next((t.name for t in GGUF_TYPES.values() if int(t.file_type) == int(file_type)), "f16")


@contextlib.contextmanager
def cls_last(tower):
    """Run the CLIP tower with the token order of llama.cpp's defective graph: patches, then CLS.

    Positions stay 0..N in sequence order (llama.cpp fills them so), so patch i gets
    position embedding i (the original: i + 1) and the CLS gets position N.
    """

    def embeddings(module, args, kwargs, out):
        pixels = args[0] if args else kwargs["pixel_values"]
        x = module.patch_embedding(pixels.to(module.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([x, module.class_embedding.expand(x.shape[0], 1, -1)], 1)
        return x + module.position_embedding.weight[: x.shape[1]]

    handle = tower.embeddings.register_forward_hook(embeddings, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def detect_cls_defect(reference: OriginalLlava, pixels: torch.Tensor,
                      llama: torch.Tensor) -> tuple[bool, torch.Tensor, dict]:
    """Which order llama.cpp's image embeddings follow: the original (CLS first) or the defect's (CLS last).

    Returns:
        (defect present, the embeddings llama.cpp should give, the cosines measured).
    """
    original = reference.encode_images(pixels)[0]
    with cls_last(reference.vision_tower):
        defective = reference.encode_images(pixels)[0]
    cos = {"cosine_vs_original": _cosine(original, llama), "cosine_vs_cls_last": _cosine(defective, llama)}
    defect = cos["cosine_vs_cls_last"] > cos["cosine_vs_original"]
    return defect, (defective if defect else original), cos


def _llama_ids(run: Run) -> list[int]:
    """The prompt as the original writes it: text ids, one -200 per image (llama.cpp's NeXT tiles are one image)."""
    ids: list[int] = []
    for chunk in run.chunks:
        if chunk.kind == "text":
            ids += chunk.ids
        elif not ids or ids[-1] != IMAGE_TOKEN_INDEX:
            ids.append(IMAGE_TOKEN_INDEX)
    return ids


def _language_model(original: Path, options: LoadOptions):
    """The transformers language model the GGUF was written from (same first-stage plan), float32."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .gguf_export import LM, open_input

    llava = open_input(original, options)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(llava.text)
    state = {k[len(LM):]: llava.source.read(k).float() for k in llava.source.keys() if k.startswith(LM)}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def _lm_logits(model, run: Run) -> torch.Tensor:
    """Logits at the positions where llama.cpp chose its greedy tokens, from llama.cpp's own inputs."""
    table = model.get_input_embeddings()
    parts = [table(torch.tensor(c.ids)) if c.kind == "text" else torch.from_numpy(c.embeddings) for c in run.chunks]
    parts.append(table(torch.tensor(run.tokens[:-1], dtype=torch.long)))
    logits = model(inputs_embeds=torch.cat(parts)[None].float()).logits[0]
    return logits[-len(run.tokens):]


def verify(original: Path, folder: Path, options: LoadOptions, probes, *, max_new_tokens: int = 8) -> Report:
    """Run the GGUF pair in llama.cpp and the original model on the same probes; report every difference.

    Args:
        original: the original LLaVA checkpoint (any form; ``options`` as for convert).
        folder: written by ``vlmkit convert ORIGINAL folder --to gguf``.
        probes: (image, question) pairs; the first is also the language-model and square-image probe.
    """
    llama_cpp, _ = load_bindings()  # first: without llama-cpp-python, one error naming the extra to install

    if form_of(original) is None:
        raise ConfigError(f"{original}: `vlmkit verify` compares a GGUF folder with the ORIGINAL LLaVA checkpoint",
                          hint="pass the original checkpoint the folder was converted from")
    model_file, mmproj_file = gguf_pair(folder)
    kind = type_of(model_file)
    bounds = BOUNDS.get(kind, LOOSE)
    ckpt = open_original(original, options)
    template = template_for(ckpt, options)
    report = Report("LLaVA GGUF parity: llama.cpp vs the original model", str(original), str(folder), inputs={
        "files": f"{model_file.name} + {mmproj_file.name} ({kind})",
        "llama.cpp": f"llama-cpp-python {llama_cpp.__version__}", "template": template,
        "probes": [f"{Path(i).name}: {q!r}" for i, q in probes], "max_new_tokens": max_new_tokens},
        assumptions=list(ckpt.assumptions))
    try:
        report.checks.append(Check("files", True, output.verify_files(folder), "sha256 of every file = the manifest's"))
    except ManifestError as e:
        report.checks.append(Check("files", False, {}, "sha256 of every file = the manifest's", e.message))

    vision = ckpt.vision_config
    side, n_patches = vision["image_size"], (vision["image_size"] // vision["patch_size"]) ** 2
    square = images.load_image(probes[0][0]).resize((side, side), images.BICUBIC)
    tiles = max((w * h) // (side * side) for w, h in (ckpt.config.get("image_grid_pinpoints") or [[side, side]]))
    n_ctx = 256 * (1 + (512 + n_patches * (tiles + 2) + max_new_tokens) // 256)

    # --- llama.cpp -------------------------------------------------------------------
    with LlamaCpp(model_file, mmproj_file, n_ctx=n_ctx) as llm:
        square_embeddings = torch.from_numpy(llm.tokenize(llm.marker, [square])[-1].embeddings[:n_patches])
        prompts = [templates.render(template, [("user", templates.with_image(q)), ("assistant", None)])
                   for _, q in probes]
        runs = [llm.generate(p.replace(templates.IMAGE_TOKEN, llm.marker), [image], max_new_tokens)
                for p, (image, _) in zip(prompts, probes)]

    # --- the original ------------------------------------------------------------------
    reference = OriginalLlava.load(ckpt, dtype=torch.float32)
    pixels = torch.from_numpy(images.clip_preprocess(square, reference.image_config))[None]
    defect, expected, cosines = detect_cls_defect(reference, pixels, square_embeddings)
    check = compare_tensors("image embeddings (mmproj)", expected, square_embeddings, atol=bounds.embeddings,
                            min_cosine=bounds.embeddings_cosine)
    check.measured.update(cosines)
    check.detail = (check.detail + "; " if check.detail else "") + (
        "against the original tower run in llama.cpp's defective CLS-last order (#25814)" if defect
        else "against the original tower + projector")
    report.checks.append(check)
    decode = reference.vocab.decode
    original_text = ""
    for i, (run, prompt, (image, _)) in enumerate(zip(runs, prompts, probes)):
        ids = reference.prompt_ids(prompt)
        report.checks.append(compare_ids(f"prompt ids (probe {i + 1})", ids, _llama_ids(run), decode=decode))
        pixels_i, sizes = images.preprocess([image], reference.image_config)
        features = reference.image_features(pixels_i, sizes)
        tokens = reference.greedy(ids, features, max_new_tokens, templates.stop_ids(template, reference.vocab))
        original_text = original_text or decode(tokens)
        e2e = compare_ids(f"end to end: greedy tokens (probe {i + 1})", tokens, run.tokens, decode=decode)
        llama_features = torch.from_numpy(np.concatenate(run.image_embeddings))
        measured = {**e2e.measured, "image_tokens": [features[0].shape[0], llama_features.shape[0]]}
        if features[0].shape == llama_features.shape:
            measured["image_embedding_cosine"] = _cosine(features[0], llama_features)
        report.checks.append(Check(e2e.name, True, measured, "reported, not judged (llama.cpp's own preprocessing)",
                                   e2e.detail or "identical"))
    report.notes.append(f"original greedy text (probe 1): {original_text!r}; llama.cpp's: {decode(runs[0].tokens)!r}")
    del reference
    gc.collect()

    # --- the language model alone ---------------------------------------------------------
    model = _language_model(original, options)
    run = runs[0]
    logits = _lm_logits(model, run)
    del model
    gc.collect()
    llama_logits = torch.from_numpy(run.logits)
    lm_checks = [compare_tensors("language model logits (llama.cpp's inputs)", logits, llama_logits,
                                 atol=bounds.logits, min_cosine=bounds.logits_cosine),
                 compare_ids("language model greedy tokens", logits.argmax(-1).tolist(), run.tokens, decode=decode)]
    if kind not in BOUNDS:  # 4/5-bit weights change the model itself: the numbers are shown, not judged
        lm_checks = [Check(c.name, True, c.measured, f"reported, not judged at {kind} (judged at f32, f16, bf16, q8_0)",
                           c.detail) for c in lm_checks]
    report.checks += lm_checks
    if defect:
        report.notes.append(f"this llama.cpp build has {DEFECT}. No GGUF can compensate: llama.cpp's image embeddings "
                            f"differ from the original model's (cosine {cosines['cosine_vs_original']:.3f}) until it is "
                            "fixed upstream; the end-to-end rows above show what that does to the answers")
    if ckpt.is_next:
        report.notes.append("llama.cpp arranges LLaVA-NeXT images its own way (overview + tiles, no unpadding and no "
                            "image_newline rows), so its image token counts differ from the original's")
    report.notes.append("the mmproj always carries clip.vision.feature_layer: without it llama.cpp runs one vision "
                        "block too few (ggml-org/llama.cpp#25817)")
    return report
