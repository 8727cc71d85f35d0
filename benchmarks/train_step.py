"""Training step cost: ``vlmkit train`` vs a plain transformers ``Trainer`` + peft script, same model and data.

Builds (random weights, locally) an original LLaVA-1.5 with a ~1.1B LLaMA-shaped language model and
a CLIP-L/336-shaped tower (the shapes of ``benchmarks/chat_latency.py``; ``--size tiny`` for the test
sizes), converts a copy to transformers for the baseline, and trains each of

* ``pretrain``: stage 1, projector only;
* ``lora``: stage 2, LoRA r=16 on the language model's linear layers + the projector;
* ``full``: stage 2, language model + projector;

for ``--steps`` optimizer steps (CPU, fp32, gradient checkpointing, batch ``--batch-size``), once with
``vlmkit.train.train`` and once with the plain script, each in its own process (so each peak RSS is
its own). Reported per run: median seconds per step (the first step, a warm-up, left out), tokens/s
(the language model's positions, image features included) and peak RSS. Target (issue 12): vlmkit's
overhead <= 5 % per step, and no more memory.

Usage:
    .venv/bin/python benchmarks/train_step.py --size tiny --steps 6
    .venv/bin/python benchmarks/train_step.py --size 1b --steps 4 --modes pretrain lora   # slow on 2 cores
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from vlmkit.families.llava import tiny

IMAGES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "images"
QUESTION = "What is in the picture?"
ANSWERS = [("chelsea.png", "A tabby cat lying on the floor and looking at the camera."),
           ("astronaut.png", "An astronaut in an orange suit smiling in front of a flag."),
           ("coffee.png", "A cup of latte with foam art on a wooden table."),
           ("rocket.png", "A rocket standing on the launch pad, ready for lift-off.")]
SIZES = {
    "1b": tiny.TinySizes(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vision_hidden=1024,
                         vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=336, patch=14),
    "tiny": tiny.TinySizes(),
}
LORA = dict(r=16, alpha=32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def build(work: Path, size: str, records: int) -> dict:
    sizes = SIZES[size]
    clip = tiny.make_clip(work / "clip", sizes)
    original = tiny.make_llava15(work / "llava-v1.5", clip, sizes, shards=2)
    import vlmkit

    vlmkit.convert(original, work / "llava-hf")
    data = [{"id": str(i), "image": ANSWERS[i % 4][0],
             "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                               {"from": "gpt", "value": ANSWERS[i % 4][1]}]} for i in range(records)]
    (work / "data.json").write_text(json.dumps(data))
    return {"original": str(original), "hf": str(work / "llava-hf"), "data": str(work / "data.json")}


# ------------------------------------------------------------------------------------------ the two runners


def run_vlmkit(paths: dict, mode: str, steps: int, batch: int, out: Path) -> dict:
    from vlmkit.train import TrainConfig, train

    timer = StepTimer()
    config = TrainConfig(model=paths["original"], data=paths["data"], image_folder=str(IMAGES), output=str(out),
                         stage="pretrain" if mode == "pretrain" else "finetune", lora=mode == "lora",
                         lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, max_steps=steps,
                         batch_size=batch, learning_rate=1e-5, warmup_ratio=0.0, save_steps=10_000,
                         group_by_modality_length=False, progress=False, tensorboard=False, max_length=2048)
    result = train(config, callbacks=[timer])
    return {"times": timer.times, "tokens": result.summary["tokens"]}


def run_plain(paths: dict, mode: str, steps: int, batch: int, out: Path) -> dict:
    """What a user writes with transformers + peft alone, on the converted model."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainingArguments

    processor = AutoProcessor.from_pretrained(paths["hf"])
    model = LlavaForConditionalGeneration.from_pretrained(paths["hf"], dtype=torch.float32)
    model.requires_grad_(False)
    if mode == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=rf".*language_model.*\.({'|'.join(TARGETS)})"))
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
    model.enable_input_require_grads()
    records = json.loads(Path(paths["data"]).read_text())

    class Lazy(torch.utils.data.Dataset):  # preprocessed per item, as LLaVA's lazy_preprocess (and vlmkit) do
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            r = records[i]
            image = Image.open(IMAGES / r["image"]).convert("RGB")
            if mode == "pretrain":  # LLaVA's "plain" format: the image, then the caption and "\n"
                prompt, answer = "<image>", r["conversations"][1]["value"] + "\n"
            else:
                chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
                prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
                answer = r["conversations"][1]["value"] + processor.tokenizer.eos_token
            full = processor(images=image, text=prompt + answer, return_tensors="pt")
            masked = len(processor(images=image, text=prompt, return_tensors="pt").input_ids[0])
            labels = full.input_ids[0].clone()
            labels[:masked] = -100
            return {"input_ids": full.input_ids[0], "labels": labels, "pixel_values": full.pixel_values[0]}

    items = Lazy()
    pad = processor.tokenizer.pad_token_id

    seen: list[int] = []

    def collate(batch_items):
        ids = torch.nn.utils.rnn.pad_sequence([i["input_ids"] for i in batch_items], batch_first=True, padding_value=pad)
        seen.append(int(ids.ne(pad).sum()))
        labels = torch.nn.utils.rnn.pad_sequence([i["labels"] for i in batch_items], batch_first=True,
                                                 padding_value=-100)
        return {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(pad),
                "pixel_values": torch.stack([i["pixel_values"] for i in batch_items])}

    timer = StepTimer()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                             activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
                             save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                             remove_unused_columns=False, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=collate, callbacks=[timer])
    trainer.train()
    return {"times": timer.times, "tokens": sum(seen[:steps])}


RUNNERS = {"vlmkit": run_vlmkit, "plain": run_plain}


def child(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    paths = json.loads(args.paths)
    out = Path(tempfile.mkdtemp(prefix=f"{args.tool}-{args.mode}-", dir=args.work))
    result = RUNNERS[args.tool](paths, args.mode, args.steps, args.batch_size, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(tool: str, mode: str, paths: dict, args, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--tool", tool, "--mode", mode, "--paths", json.dumps(paths),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--work", str(work),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{tool} {mode} failed:\n{done.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    steady = result["times"][1:] or result["times"]
    per_step = statistics.median(steady)
    return {"s_per_step": per_step, "tokens_per_s": result["tokens"] / args.steps / per_step,
            "peak_rss_mb": result["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["pretrain", "lora", "full"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        work = Path(tmp)
        paths = build(work, args.size, args.records)
        print(f"size {args.size}, {args.steps} steps (first left out), batch {args.batch_size}, fp32, CPU, "
              f"gradient checkpointing, {args.threads} thread(s)")
        print(f"{'mode':<9} {'tool':<7} {'s/step':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'overhead':>9} {'RSS':>7}")
        for mode in args.modes:
            plain = measure("plain", mode, paths, args, work)
            mine = measure("vlmkit", mode, paths, args, work)
            for tool, r in (("plain", plain), ("vlmkit", mine)):
                over = f"{(r['s_per_step'] / plain['s_per_step'] - 1) * 100:+.1f}%" if tool == "vlmkit" else ""
                rss = f"{(r['peak_rss_mb'] / plain['peak_rss_mb'] - 1) * 100:+.1f}%" if tool == "vlmkit" else ""
                print(f"{mode:<9} {tool:<7} {r['s_per_step']:>8.3f} {r['tokens_per_s']:>9.1f} "
                      f"{r['peak_rss_mb']:>12.0f} {over:>9} {rss:>7}")


if __name__ == "__main__":
    main()
