"""Making a trained GPT cheaper to run: weight-only quantization (`gptlab.compress.quantize`).

The submodules are imported on use; this package imports nothing itself.
"""
