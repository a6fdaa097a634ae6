import os

# Without CUDA, Triton kernels run through the interpreter on CPU tensors. Set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
