"""Parameter-efficient fine-tuning: LoRA adapters (`gptlab.finetune.lora`) on a frozen base that
may be stored quantized as in QLoRA (`gptlab.finetune.quant`).

The submodules are imported on use; this package imports nothing itself.
"""
