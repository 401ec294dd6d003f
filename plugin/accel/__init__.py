"""Model acceleration: structured pruning, int8 quantization, the accuracy gate, export
and benchmarks (``radpipe optimize``, ``radpipe bench``). Heavy imports (torchao,
torch-pruning, onnxruntime) stay inside the modules that need them."""
