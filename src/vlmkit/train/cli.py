"""``vlmkit train`` and ``vlmkit merge-lora``: registered by ``add_train_commands(subparsers)``.

Multi-process runs use the standard launchers, which set ``RANK`` / ``WORLD_SIZE``:
``torchrun --nproc_per_node 2 -m vlmkit.cli train ...``, ``accelerate launch -m vlmkit.cli train ...``,
``deepspeed --module vlmkit.cli train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from ..options import LoadOptions, add_load_arguments, refuse_unused
from .config import PRECISIONS, STAGES, TrainConfig

TRAIN_EXAMPLES = [
    "vlmkit train vicuna-7b-v1.5/ --stage pretrain --vision-tower clip-vit-large-patch14-336/ "
    "--data blip_558k.json --image-folder images/ --output runs/pretrain",
    "vlmkit train llava-v1.5-7b/ --data wukong.json --image-folder images/ --output runs/llava-wukong-lora "
    "--lora --projector-lr 2e-5 --deepspeed zero2",
    "vlmkit train runs/pretrain/ --model-base vicuna-7b-v1.5/ --data mix665k.json --image-folder data/ "
    "--output runs/finetune --deepspeed zero3",
    "vlmkit train llava-v1.5-7b/ --data wukong.json --image-folder images/ --output runs/llava-wukong-lora --lora --resume",
    "torchrun --nproc_per_node 2 -m vlmkit.cli train llava-v1.5-7b/ --data d.json --output runs/x --lora --deepspeed zero3",
]
MERGE_EXAMPLES = [
    "vlmkit merge-lora runs/llava-wukong-lora/ --base llava-v1.5-7b/ llava-wukong/",
    "vlmkit merge-lora runs/llava-wukong-lora/ --base llava-v1.5-7b/ llava-wukong-hf/ --format transformers",
]


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the start: an original LLaVA checkpoint (full, projector-only with --model-base, "
                                 "LoRA with --model-base) or a plain language model with --vision-tower")
    p.add_argument("--data", required=True, help="training records (LLaVA JSON/JSONL, ShareGPT, messages)")
    p.add_argument("--image-folder", help="where relative image paths start")
    p.add_argument("--strict-data", action="store_true",
                   help="refuse the records the original trains on in its own way (leading gpt turn, <image> in an "
                        "answer or missing ...), as `vlmkit data check --strict` does; default: train them as it does")
    p.add_argument("--output", required=True, help="the run folder: checkpoints, logs, final outputs")
    p.add_argument("--stage", choices=list(STAGES), default="finetune",
                   help="; ".join(f"{k}: {v.what}" for k, v in STAGES.items()) + " (default: finetune)")
    parts = p.add_argument_group("what learns")
    parts.add_argument("--lora", action="store_true", help="LoRA on the language model (projector trained in full)")
    parts.add_argument("--lora-r", type=int, default=128, help="LoRA rank (default: 128, as finetune_lora.sh)")
    parts.add_argument("--lora-alpha", type=int, default=256, help="LoRA alpha (default: 256)")
    parts.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    parts.add_argument("--lora-targets", nargs="+", metavar="NAME",
                       help="module names to adapt (default: every linear layer of the language model but lm_head)")
    parts.add_argument("--train-vision", action="store_true", help="also train the vision tower (frozen by default)")
    parts.add_argument("--init-projector", metavar="mm_projector.bin", help="start the projector from a stage-1 output")
    new = p.add_argument_group("a new LLaVA from a plain language model")
    new.add_argument("--projector-type", default="mlp2x_gelu", help="linear, mlpNx_gelu or identity (default: mlp2x_gelu)")
    new.add_argument("--vision-select-layer", type=int, default=-2, help="CLIP layer whose features are used (default: -2)")
    new.add_argument("--image-aspect-ratio", choices=["pad", "square"], default="pad", help="default: pad")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--learning-rate", "--lr", type=float,
                     help="default: 1e-3 (pretrain), 2e-4 (LoRA), 2e-5 (full), as LLaVA-1.5's scripts")
    opt.add_argument("--projector-lr", type=float, help="the projector's own learning rate (LLaVA's mm_projector_lr)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--warmup-ratio", type=float, default=0.03)
    opt.add_argument("--lr-scheduler", default="cosine", help="a transformers scheduler name (default: cosine)")
    opt.add_argument("--epochs", type=float, default=1.0)
    opt.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    opt.add_argument("--batch-size", type=int, default=16, help="per process (default: 16)")
    opt.add_argument("--gradient-accumulation", type=int, default=1)
    opt.add_argument("--max-grad-norm", type=float, default=1.0)
    opt.add_argument("--max-length", type=int, help="model_max_length (default: the checkpoint's, else 2048)")
    opt.add_argument("--no-group-by-modality-length", dest="group_by_modality_length", action="store_false",
                     help="plain random order instead of LLaVA's length grouping")
    opt.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    opt.add_argument("--precision", choices=PRECISIONS, default="auto",
                     help="auto: bf16 on a GPU that has it, else fp32 (CPU)")
    opt.add_argument("--deepspeed", metavar="PRESET|JSON",
                     help="zero2, zero3, zero3_offload, or a DeepSpeed JSON file (checked before anything loads)")
    run = p.add_argument_group("checkpoints and logs")
    run.add_argument("--save-steps", type=int, default=500)
    run.add_argument("--save-total-limit", type=int, default=1)
    run.add_argument("--logging-steps", type=int, default=1)
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    run.add_argument("--force", action="store_true", help="start anew in an --output that holds a run")
    run.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--dataloader-workers", type=int, default=0)
    add_load_arguments(p, UNUSED_OPTIONS)  # those train refuses are not offered by --help


# loading options train has no use for: not in --help, refused with the flag to use instead, never ignored
UNUSED_OPTIONS = {
    "dtype": "training computes in --precision (auto, fp32, bf16, fp16) and writes what the model is stored in",
    "device": "training runs on every GPU the launcher gives it (CUDA_VISIBLE_DEVICES, torchrun), else the CPU",
    "config": "training builds the model from its checkpoint's own config; convert it with --config first",
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    refuse_unused(args, "train", UNUSED_OPTIONS)
    options = LoadOptions.from_args(args)
    return TrainConfig(
        model=args.model, data=args.data, output=args.output, stage=args.stage, image_folder=args.image_folder,
        strict_data=args.strict_data,
        lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=tuple(args.lora_targets) if args.lora_targets else None, train_vision=args.train_vision,
        init_projector=args.init_projector, projector_type=args.projector_type,
        vision_select_layer=args.vision_select_layer, image_aspect_ratio=args.image_aspect_ratio,
        learning_rate=args.learning_rate, projector_lr=args.projector_lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, gradient_accumulation=args.gradient_accumulation,
        max_grad_norm=args.max_grad_norm, max_length=args.max_length,
        group_by_modality_length=args.group_by_modality_length, gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision, seed=args.seed, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, resume=args.resume, force=args.force, tensorboard=args.tensorboard,
        progress=not args.quiet, dataloader_workers=args.dataloader_workers, deepspeed=args.deepspeed,
        vision_tower=options.vision_tower, model_base=options.model_base, template=options.template)


def cmd_train(args) -> int:
    from .run import train

    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(config_from_args(args), announce=(lambda m: print(m, file=sys.stderr)) if rank0 else None)
    except KeyboardInterrupt:
        print("interrupted: the latest complete checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130
    if rank0:
        final = f", final loss {result.losses[-1][1]:.4f}" if result.losses else ""
        print(f"trained {result.steps} step(s){final}; wrote {result.output}: {', '.join(result.files)}")
    return 0


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="the LoRA run (adapter_config.json + non_lora_trainables.bin): LLaVA's --model-path")
    p.add_argument("--base", required=True, help="the model it was trained on: LLaVA's --model-base")
    p.add_argument("output", help="the merged model's folder (must not exist unless --force)")
    p.add_argument("--format", choices=["original", "transformers"], default="original",
                   help="original LLaVA layout (default) or the published llava-hf layout with processor")
    p.add_argument("--force", action="store_true", help="replace an existing output (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_load_arguments(p, MERGE_UNUSED)


# loading options merge-lora has no use for: not in --help, refused with the reason, never ignored
MERGE_UNUSED = {
    "device": "the merge streams the tensors from file to file on the CPU, as convert does",
    "model_base": "the base the run was trained on is --base",
}


def cmd_merge(args) -> int:
    from ..console import progress_bar
    from ..conversion.plan import human_bytes
    from .merge import merge_lora

    refuse_unused(args, "merge-lora", MERGE_UNUSED)
    result = merge_lora(args.adapter, args.base, args.output, format=args.format, options=LoadOptions.from_args(args),
                        force=args.force, progress=None if args.quiet else progress_bar("merging"),
                        announce=lambda note: print(f"note: {note}", file=sys.stderr))
    print(f"wrote {args.output} ({args.format} layout): {len(result.plan.targets)} tensors, "
          f"{human_bytes(result.plan.bytes_out)}; run it: vlmkit chat {args.output} --image IMAGE --prompt '...'")
    return 0


COMMANDS = [
    ("train", "fine-tune LLaVA: projector pre-training, LoRA or full fine-tuning, DeepSpeed ZeRO-2/3, resumable",
     TRAIN_EXAMPLES, _train_arguments, cmd_train),
    ("merge-lora", "merge a LoRA run into its base: one standalone model (original or llava-hf layout)",
     MERGE_EXAMPLES, _merge_arguments, cmd_merge),
]


def add_train_commands(subparsers) -> None:
    """Register ``train`` and ``merge-lora`` on the ``vlmkit`` command's subparsers."""
    for name, help_text, examples, arguments, fn in COMMANDS:
        epilog = "examples:\n" + textwrap.indent("\n".join(examples), "  ")
        p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments(p)
        p.set_defaults(func=fn)
