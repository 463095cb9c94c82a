"""The names `convert` knows, torch-free so that `convert --help` stays light."""

# --loader and --saver names (ModelLink's included) -> the format each reads or writes.
LOADERS = {"hf": "hf", "llama2_hf": "hf", "megatron": "megatron", "lightning": "lightning"}
SAVERS = {"hf": "hf", "megatron": "megatron"}
MG2HG = "mg2hg"  # ModelLink writes Megatron -> HF results into this subfolder of --save-dir
