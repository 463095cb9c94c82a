"""What runs inside `fit`: the LightningModule, the one strategy, the parallel plan, the optimizer and
schedule, the memory plan and the NPU accelerator."""
