"""Values the command-line options and the library both use, torch-free so that `--help` stays light."""

# The names config.DTYPES maps to torch dtypes (short and torch spellings), for `choices` before torch loads.
DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
AUTO_DTYPE = "auto"  # keep the checkpoint's own dtype
AUTO_DEVICE = "auto"  # resolved by generation.loading.resolve_device: cuda, else npu, else cpu
