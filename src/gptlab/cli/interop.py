"""Hugging Face interop commands: import-hf, export-hf."""

from __future__ import annotations

import argparse

from gptlab.cli.common import Register


def cmd_import_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptlab.errors import ConfigError
    from gptlab.hf import import_hf

    if (Path(args.src) / "adapter_config.json").is_file():
        from gptlab.finetune.lora import import_peft_adapter

        out = import_peft_adapter(args.src, args.out, base=args.base, force=args.force)
        print(f"imported the PEFT LoRA adapter {args.src} as a gptlab adapter checkpoint: {out} (merge-lora, sample, chat and sft take it)")
        return 0
    if args.base is not None:
        raise ConfigError("--base applies to a PEFT adapter directory (one with adapter_config.json)")
    loaded = import_hf(args.src, args.out, revision=args.revision, force=args.force)
    cfg, tok = loaded.config, loaded.tokenizer
    print(f"imported {args.src} ({loaded.model_type}): {loaded.model.num_params(non_embedding=False):,} parameters, {cfg.n_layer} layers, "
          f"{cfg.n_embd} wide, context {cfg.block_size}; tokenizer {type(tok).__name__} with {tok.vocab_size:,} ids")  # fmt: skip
    print(f"checkpoint: {args.out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptlab.checkpoint import HEAD_KEY, LORA_KEY, find_checkpoint, read_checkpoint_meta
    from gptlab.hf import export_hf

    ckpt = find_checkpoint(args.ckpt) if Path(args.ckpt).is_dir() else None
    if ckpt is not None and HEAD_KEY in read_checkpoint_meta(ckpt):
        from gptlab.finetune.heads import export_task_hf

        out, arch = export_task_hf(ckpt, args.out, force=args.force)
        print(f"exported the task model to {out}: transformers.{arch}.from_pretrained loads it (config.json's gptlab_task gives the input format)")
        return 0
    if ckpt is not None and LORA_KEY in read_checkpoint_meta(ckpt) and not args.merged:
        from gptlab.finetune.lora import export_adapter_hf

        out = export_adapter_hf(ckpt, args.out, force=args.force)
        print(f"exported the LoRA adapter to {out} (PEFT files and the tokenizer) and its base model to {out / 'base'}: "
              f"peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{out / 'base'}'), '{out}') loads it")  # fmt: skip
        return 0
    out = export_hf(args.ckpt, args.out, force=args.force)
    print(f"exported to {out}: loads with transformers.AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained")
    return 0


def register(sub: argparse._SubParsersAction, command: Register) -> None:
    # Hugging Face interop
    t = command("import-hf", cmd_import_hf, "convert a Hugging Face GPT-2, GPT-1, Llama, Qwen3 or Mistral model (local directory or hub name), or a PEFT LoRA adapter for one, into a gptlab checkpoint")
    t.add_argument("src", help="directory with config.json + model.safetensors/pytorch_model.bin, or a hub name such as gpt2 (needs network)")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--revision", help="hub branch, tag or commit (hub names only)")
    t.add_argument("--base", help="for a PEFT LoRA adapter directory: its base as a gptlab checkpoint (default: import the adapter's base_model_name_or_path)")
    t.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    t = command("export-hf", cmd_export_hf, "write a checkpoint as a Hugging Face model directory (config.json, model.safetensors, tokenizer)")
    t.add_argument("ckpt", help="run directory or checkpoint directory")
    t.add_argument("--out", required=True, help="directory to write")
    t.add_argument("--force", action="store_true", help="replace --out if it already holds files")

    t.add_argument("--merged", action="store_true", help="a LoRA run: export the model with the adapters merged in, instead of a PEFT adapter + its base")
