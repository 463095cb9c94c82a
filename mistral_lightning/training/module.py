"""MistralLightningModule: the training, evaluation and prediction steps around the plain `Mistral` module.

The model is built on the meta device in `configure_model`, spread over the strategy's device
mesh by the plan in `training/parallel.py`, and only then filled: with each rank's slices of the pretrained
HF weights, or with a layout-independent random initialisation.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torchmetrics.aggregation import MeanMetric

from mistral_lightning.adapters.lora import LoRAConfig, WithoutAdapters, adapters_disabled
from mistral_lightning.adapters.nf4 import check_quantize_base, materialize_nf4_
from mistral_lightning.checkpoint.hf import load_hf_weights
from mistral_lightning.config import MistralConfig, resolve_model_config, window_choice_note
from mistral_lightning.data.contract import (
    data_batch_shape,
    data_fixed_width,
    data_holds_preference_pairs,
    data_seq_length,
)
from mistral_lightning.devices import device_name, total_memory
from mistral_lightning.errors import UserError
from mistral_lightning.kernels.cross_entropy import Reduction
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.model import Mistral
from mistral_lightning.training.divergence import TrainingDivergedError, last_good
from mistral_lightning.training.gradients import gradient_scale, scale_gradients_
from mistral_lightning.training.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler
from mistral_lightning.training.parallel import (
    ParallelConfig,
    clip_grad_norm_,
    compiles,
    context_parallel_group,
    init_adapters,
    init_weights,
    mixed_precision_policy,
    parallelize,
    sharding_mesh,
)
from mistral_lightning.training.preference import (
    PAIR_STATISTICS,
    ObjectiveConfig,
    PairSums,
    PreferenceTerms,
    pair_statistic_sums,
    pair_sums,
    preference_losses,
)

LossNormalization = Literal["token", "micro_batch"]


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. the vocab-parallel loss) as a plain tensor; gradients flow through."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _settings(cls: type, value: Any) -> Any:
    """A settings group as its dataclass, from the dataclass itself or a dict of its fields."""
    return value if isinstance(value, cls) else cls(**value)


def _describe(settings: Any) -> Any:
    """A settings group as the user writes it in a config (none: not set)."""
    return "none" if settings is None else dataclasses.asdict(settings)


class MistralLightningModule(L.LightningModule):
    """Pretraining and fine-tuning of Mistral with tensor, sequence and fully sharded data parallelism.

    Args:
        model_config: a preset name (see `MistralConfig.from_name`) or a full config; None reads
            `pretrained`'s config.json.
        pretrained: an HF folder (config.json + safetensors) to start from; None starts from random weights.
        optimizer: AdamW's lr, weight_decay, betas and eps (norm weights get no decay).
        schedule: warmup_fraction, then kind "cosine" (to min_lr at the last step) or "constant".
        parallel: sequence_parallel, activation_checkpointing and compile (the mesh sizes are the strategy's).
        lora: train low-rank adapters (rank, alpha, dropout, targets) over the frozen `pretrained` weights;
            checkpoints then hold the adapters and their optimizer state only.
        loss_chunk_size: positions per chunk of the LM head + cross-entropy, bounding fp32 logits.
        loss_normalization: "token": an optimizer step's loss is the mean over every labelled token of its
            global batch (all micro-batches, all data-parallel ranks), the same for any layout;
            "micro_batch": Megatron's mean over each micro-batch's tokens, averaged over the micro-batches (of
            all ranks) that hold a labelled token. Under DPO the same two rules count pairs instead of tokens.
        objective: "sft" (next-token cross-entropy) or "dpo" over preference pairs, with its beta,
            label_smoothing and loss (training/preference.py); DPO needs a preference DataModule.
        max_new_tokens: greedy tokens per prompt in `predict_step`.
        init_seed: seed of the random initialisation (same weights under any TP/DP layout).
    """

    def __init__(
        self,
        model_config: str | MistralConfig | None = None,
        pretrained: str | None = None,
        # The groups are frozen dataclasses, so one shared default instance is safe.
        optimizer: OptimizerConfig = OptimizerConfig(),  # noqa: B008
        schedule: ScheduleConfig = ScheduleConfig(),  # noqa: B008
        parallel: ParallelConfig = ParallelConfig(),  # noqa: B008
        lora: LoRAConfig | None = None,
        loss_chunk_size: int = 1024,
        loss_normalization: LossNormalization = "token",
        objective: ObjectiveConfig = ObjectiveConfig(),  # noqa: B008
        max_new_tokens: int = 64,
        init_seed: int = 42,
    ) -> None:
        super().__init__()
        if loss_normalization not in ("token", "micro_batch"):
            raise UserError(
                f"model.loss_normalization={loss_normalization!r} is not one of 'token', 'micro_batch'"
            )
        self.save_hyperparameters()
        if lora is not None and pretrained and not Path(pretrained).is_dir():
            raise UserError(
                f"model.pretrained={pretrained} is not a folder: LoRA adapters, and their checkpoints, hold no "
                "base weights; restore the base model there or set model.pretrained to a copy of it"
            )
        # A checkpoint's hyper-parameters come back as dicts (load_from_checkpoint).
        self.lora_config = None if lora is None else _settings(LoRAConfig, lora)
        self.objective = _settings(ObjectiveConfig, objective)
        if self.objective.is_preference and self.lora_config is not None and self.lora_config.adapter:
            raise UserError(
                f"model.lora.adapter={self.lora_config.adapter} with model.objective.kind: dpo: the reference would "
                "be the base without that adapter; merge it into the base (export merges a LoRA checkpoint by "
                "default) and give that folder as model.pretrained, so that DPO starts from and compares against "
                "the same model"
            )
        self.config = resolve_model_config(model_config, pretrained)
        note = window_choice_note(self.config, pretrained) if model_config is not None else None
        if note:
            rank_zero_info(note)
        self.optimizer_config = _settings(OptimizerConfig, optimizer)
        self.schedule_config = _settings(ScheduleConfig, schedule)
        self.parallel_config = _settings(ParallelConfig, parallel)
        # Checkpoint metadata must stay plain data: Lightning reloads it with torch.load(weights_only=True).
        if isinstance(model_config, MistralConfig):
            self.hparams["model_config"] = dataclasses.asdict(model_config)
        self.hparams["optimizer"] = dataclasses.asdict(self.optimizer_config)
        self.hparams["schedule"] = dataclasses.asdict(self.schedule_config)
        self.hparams["parallel"] = dataclasses.asdict(self.parallel_config)
        # What an adapter checkpoint needs besides itself: this LoRA config and the base, `pretrained`.
        self.hparams["lora"] = None if lora is None else dataclasses.asdict(self.lora_config)
        self.hparams["objective"] = dataclasses.asdict(self.objective)
        self.model: Mistral | None = None
        # DPO's reference for full fine-tuning: a frozen copy, kept out of the module's children so that it is
        # neither trained nor saved in checkpoints (it is rebuilt from model.pretrained).
        self._reference: list[Mistral] = []
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # DPO's evaluation: the share of pairs whose chosen answer gets the larger reward.
        self.val_accuracy = MeanMetric()
        self.test_accuracy = MeanMetric()
        # This rank's [loss numerator, its denominator, labelled tokens (DPO: pairs), DPO's PAIR_STATISTICS] over
        # the micro-batches of the optimizer step under way; reduced once per step in on_before_optimizer_step.
        self._step_totals: torch.Tensor | None = None
        self._step_skipped = False
        self.skipped_steps = 0
        self._compile = False  # model.parallel.compile resolved in configure_model

    @property
    def model_name(self) -> str:
        """How the throughput summary names the model."""
        if self.hparams.pretrained:
            return Path(self.hparams.pretrained).name
        model_config = self.hparams.model_config
        return (
            model_config if isinstance(model_config, str) else f"Mistral-{self.config.num_params / 1e6:.0f}M"
        )

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:  # already built (e.g. validate after fit)
            return
        if self.device_mesh is None:
            raise UserError(
                "MistralLightningModule needs a device mesh: set trainer.strategy to "
                "lightning.pytorch.strategies.ModelParallelStrategy or mistral_lightning.training.strategy.DeviceModelParallelStrategy"
            )
        check_quantize_base(self.lora_config, self.device_mesh["tensor_parallel"].size())
        if self.objective.is_preference and context_parallel_group(self.device_mesh) is not None:
            raise UserError(
                "model.objective.kind: dpo does not run under context parallelism yet (it would cut a row of pairs "
                "over ranks); set trainer.strategy.init_args.context_parallel_size: 1"
            )
        checkpointing = self.parallel_config.activation_checkpointing
        if checkpointing == "auto":
            checkpointing = self._auto_checkpointing()
        self._compile = self._resolve_compile()
        model = self._build_model(self.lora_config, checkpointing)
        if self.objective.is_preference and self.lora_config is None:
            reference = self._build_model(None, "none")
            reference.requires_grad_(False)
            self._reference = [reference.eval()]
        if self.lora_config is not None:
            init_adapters(model, self.hparams.init_seed)
            if self.lora_config.adapter:
                from mistral_lightning.adapters.peft_format import load_peft_adapter

                load_peft_adapter(model, self.lora_config.adapter)
        self.model = model

    def _auto_checkpointing(self) -> list[str]:
        """The fastest per-block mix the memory plan fits on this device (training/auto_checkpointing.py)."""
        from mistral_lightning.training.auto_checkpointing import broadcast_choice
        from mistral_lightning.training.layouts import TrainingLayout
        from mistral_lightning.training.memory_plan import StepShape

        micro_batch_size, seq_length = data_batch_shape(self.trainer)
        if micro_batch_size is None:
            raise UserError(
                "model.parallel.activation_checkpointing: auto needs the batch shape: use one of the DataModules "
                "(data.init_args.micro_batch_size and seq_length), or choose a policy"
            )
        mesh, trainer = self.device_mesh, self.trainer
        context = context_parallel_group(mesh)
        layout = TrainingLayout(
            model=self.config,
            data_parallel=mesh["data_parallel"].size(),
            tensor_parallel=self.tensor_parallel_size,
            context_parallel=1 if context is None else context.size(),
            precision=str(trainer.precision),
            parallel=self.parallel_config,
            optimizer=self.optimizer_config,
            step=StepShape(
                micro_batch_size=micro_batch_size,
                seq_length=seq_length,
                micro_batches=trainer.accumulate_grad_batches,
                gradient_clip_val=trainer.gradient_clip_val,
                loss_chunk_size=self.hparams.loss_chunk_size,
            ),
            lora=self.lora_config,
            objective=self.objective,
        )
        device = trainer.strategy.root_device
        capacity = total_memory(device, trainer.num_devices if device.type == "cpu" else 1)
        policies, line = broadcast_choice(layout, capacity, device.type, device_name(device))
        rank_zero_info(line)
        return policies

    def _resolve_compile(self) -> bool:
        """model.parallel.compile with "auto" resolved (training/parallel.py `compiles`), said in one line."""
        setting = self.parallel_config.compile
        device = self.trainer.strategy.root_device
        fixed_width = data_fixed_width(self.trainer)
        context = context_parallel_group(self.device_mesh) is not None
        chosen = compiles(setting, device.type, fixed_width, context)
        if setting == "auto":
            why = "every batch seq_length wide" if fixed_width else "batch widths vary or unknown"
            why += ", context parallel" if context else ""
            rank_zero_info(f"compile auto: blocks {'compiled' if chosen else 'eager'} ({device.type}, {why})")
        return chosen

    def _build_model(self, lora: LoRAConfig | None, activation_checkpointing: str | list[str]) -> Mistral:
        """The model on the meta device, parallelized, then filled with model.pretrained's or random weights."""
        with torch.device("meta"):
            model = Mistral(self.config)
        parallelize(
            model,
            self.device_mesh,
            sequence_parallel=self.parallel_config.sequence_parallel,
            activation_checkpointing=activation_checkpointing,
            compile=self._compile,
            mp_policy=mixed_precision_policy(self.trainer.precision),
            seq_length=data_seq_length(self.trainer),
            lora=lora,
        )
        model.to_empty(device=self.trainer.strategy.root_device)
        materialize_nf4_(model)  # QLoRA's NF4 weights get device storage, for the loaders to quantise into
        if self.hparams.pretrained:
            load_hf_weights(WithoutAdapters(model), self.hparams.pretrained)
        else:
            init_weights(model, self.hparams.init_seed)
        return model

    def setup(self, stage: str) -> None:
        pairs = data_holds_preference_pairs(self.trainer)
        if pairs is None or pairs == self.objective.is_preference:
            return
        if pairs:
            raise UserError(
                "the data holds preference pairs (PreferenceDataModule) but model.objective.kind is sft, which would "
                "train on the rejected answers too; set --model.objective.kind dpo, or use an InstructionDataModule"
            )
        raise UserError(
            "model.objective.kind: dpo needs preference pairs: use --data PreferenceDataModule over data "
            "preprocessed with --handler preference"
        )

    @property
    def vocab_size(self) -> int:
        """What the DataModules check token ids against (data/contract.py)."""
        return self.config.vocab_size

    @property
    def sliding_window(self) -> int | None:
        """What the DataModules cut sequences by under context parallelism (data/contract.py)."""
        return self.config.sliding_window

    @property
    def tensor_parallel_size(self) -> int:
        return self.device_mesh["tensor_parallel"].size()

    def _loss(self, batch: dict[str, torch.Tensor], reduction: Reduction = "mean") -> torch.Tensor:
        seq_len = batch["input_ids"].shape[1]
        if self.parallel_config.sequence_parallel and seq_len % self.tensor_parallel_size:
            raise UserError(
                f"a batch of {seq_len} positions cannot be split over tensor_parallel_size="
                f"{self.tensor_parallel_size} for sequence parallelism; make data.seq_length and "
                "data.pad_to_multiple_of multiples of it, or set model.parallel.sequence_parallel: false"
            )
        # loss_parallel: under TP the logits are a DTensor sharded on the vocabulary and the
        # cross-entropy is computed without gathering them; plain tensors are unaffected.
        with loss_parallel():
            loss = self.model.loss(
                batch["input_ids"],
                batch["labels"],
                batch.get("position_ids"),
                document_ids=batch.get("document_ids"),
                chunk_size=self.hparams.loss_chunk_size,
                compiled=self._compile,
                reduction=reduction,
            )
        return _plain(loss)

    def _preference_terms(self, batch: dict[str, torch.Tensor]) -> tuple[PreferenceTerms, PairSums]:
        """DPO's per-pair terms of a batch of pair rows, and the policy's answer log-probabilities."""
        document_ids = batch["document_ids"]
        inputs = (batch["input_ids"], batch["labels"], batch.get("position_ids"))
        options = {"document_ids": document_ids, "chunk_size": self.hparams.loss_chunk_size}
        with loss_parallel():
            # The reference first: its activations are freed before the policy's graph is built.
            with torch.no_grad():
                if self._reference:
                    reference_tokens = self._reference[0].token_log_probs(*inputs, **options)
                else:
                    with adapters_disabled(self.model):
                        reference_tokens = self.model.token_log_probs(*inputs, **options)
            policy_tokens = self.model.token_log_probs(*inputs, **options)
        policy = pair_sums(policy_tokens, document_ids)
        answer_tokens = pair_sums((batch["labels"] != IGNORE_INDEX).to(policy_tokens.dtype), document_ids)
        terms = preference_losses(
            self.objective, policy, pair_sums(reference_tokens, document_ids), answer_tokens
        )
        return terms, policy

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.objective.is_preference:
            return self._preference_step(batch)
        # No host sync here: the step's totals are reduced once, before the optimizer step.
        labelled = (batch["labels"] != IGNORE_INDEX).sum()
        if self.hparams.loss_normalization == "token":
            # The sum: the gradients are divided by the global batch's token count in on_before_optimizer_step.
            loss = self._loss(batch, reduction="sum")
            denominator = labelled
        else:
            # The micro-batch's mean. Under context parallelism its tokens are spread over the context ranks
            # (one all-reduce of the count): each divides its shard's sum by the whole micro-batch's count.
            count, context = labelled, context_parallel_group(self.device_mesh)
            if context is not None:
                count = labelled.clone()
                torch.distributed.all_reduce(count, group=context)
            loss = self._loss(batch, reduction="sum") / count.clamp(min=1)
            # A micro-batch without a labelled token has no mean (its loss is 0): it is left out of the average;
            # its context ranks share the one count it makes.
            denominator = (count > 0).to(loss.dtype) / (1 if context is None else context.size())
        self._add_to_step_totals(
            torch.stack([loss.detach(), denominator.to(loss.dtype), labelled.to(loss.dtype)])
        )
        return loss

    def _preference_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """DPO: the sum of the micro-batch's pair losses (token rule: divided by the global batch's pair count
        before the optimizer step) or their mean (micro_batch rule)."""
        terms, policy = self._preference_terms(batch)
        pairs = terms.present.sum().to(terms.losses.dtype)
        loss = terms.losses.sum()
        if self.hparams.loss_normalization == "token":
            denominator = pairs
        else:
            loss, denominator = loss / pairs.clamp(min=1), (pairs > 0).to(loss.dtype)
        statistics = pair_statistic_sums(terms, policy)
        self._add_to_step_totals(torch.cat([torch.stack([loss.detach(), denominator, pairs]), statistics]))
        return loss

    def _add_to_step_totals(self, totals: torch.Tensor) -> None:
        self._step_totals = totals if self._step_totals is None else self._step_totals + totals

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after the last micro-batch's backward and before clipping: one reduction of
        the step's totals over the data-parallel ranks, then the gradients are scaled to the step's loss."""
        totals, self._step_totals = self._step_totals, None
        dp_mesh = sharding_mesh(self.device_mesh)
        if dp_mesh.size() > 1:
            # Tensor-parallel peers hold the same batch but sit in different data-parallel groups: none is counted
            # twice. Context-parallel ranks hold different positions of it: their totals add up.
            torch.distributed.all_reduce(totals, group=dp_mesh.get_group())
        # The step's one device-to-host copy; DPO adds its pair statistics after the three.
        loss_total, denominator, labelled, *pair_statistics = totals.tolist()
        self._step_skipped = labelled == 0
        if self._step_skipped:
            self._skip_empty_step()
            return
        loss = loss_total / denominator
        # Every rank holds the same reduced value, so all of them stop together.
        if not math.isfinite(loss):
            folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            raise TrainingDivergedError(
                f"training loss is {loss} at step {self.global_step}; stopping before this step updates the "
                f"weights, so the last saved checkpoint is intact; {last_good(folder)}. Lower "
                "model.optimizer.lr, check the data, or resume from that checkpoint (fit --ckpt_path ...)"
            )
        scale = gradient_scale(denominator, dp_mesh.size(), self.trainer.accumulate_grad_batches)
        scale_gradients_(self.model.parameters(), scale)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        for name, value in zip(PAIR_STATISTICS, pair_statistics):
            # Means over the global batch's pairs (`labelled` counts pairs under DPO).
            self.log(f"train/{name}", value / labelled, prog_bar=name == "rewards/accuracies")

    def _skip_empty_step(self) -> None:
        """No labelled token in the whole global batch: no loss to report, and AdamW leaves parameters
        without a gradient untouched (no update, no weight decay, no moment or step-count change)."""
        for param in self.model.parameters():
            param.grad = None
        self.skipped_steps += 1
        rank_zero_warn(
            f"step {self.global_step}: the global batch has no labelled token (every label is -100); the step "
            "is skipped without changing the weights. Check data.seq_length against the prompt lengths"
        )
        self.log("train/skipped_steps", float(self.skipped_steps))

    def _eval_step(self, batch: dict[str, torch.Tensor], metric: MeanMetric, accuracy: MeanMetric) -> None:
        if self.objective.is_preference:
            # Pair-weighted means over all pairs of all ranks.
            terms, _ = self._preference_terms(batch)
            weight = terms.present.to(terms.losses.dtype)
            metric.update(terms.losses.detach(), weight=weight)
            accuracy.update((terms.chosen_rewards > terms.rejected_rewards).to(weight.dtype), weight=weight)
            return
        loss = self._loss(batch)
        # Token-weighted, so the epoch value is the mean over all tokens of all ranks.
        metric.update(loss.detach(), weight=(batch["labels"] != IGNORE_INDEX).sum())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss, self.val_accuracy)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss, self.test_accuracy)

    def _log_eval(self, stage: str, metric: MeanMetric, accuracy: MeanMetric) -> None:
        loss = metric.compute()
        metric.reset()
        if self.objective.is_preference:
            values = {f"{stage}/loss": loss, f"{stage}/rewards/accuracies": accuracy.compute()}
            accuracy.reset()
        else:
            values = {f"{stage}/loss": loss, f"{stage}/perplexity": loss.exp()}
        # The metrics have already reduced over all ranks; sync_dist only tells Lightning the values agree.
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_loss, self.val_accuracy)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss, self.test_accuracy)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[list[int]]:
        """Greedy continuations (new token ids) of the prompts in `batch["input_ids"]`.

        Rows are token-id lists, or a [B, T] tensor whose `document_ids` (if given) mark padding with -1.
        """
        from mistral_lightning.generation import generate

        prompts = batch["input_ids"]
        if isinstance(prompts, torch.Tensor):
            keep = (
                batch["document_ids"] >= 0
                if "document_ids" in batch
                else torch.ones_like(prompts, dtype=torch.bool)
            )
            prompts = [row[mask].tolist() for row, mask in zip(prompts, keep)]
        return generate(self.model, prompts, self.hparams.max_new_tokens, eos_id=self.config.eos_token_id)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        # loss_parallel must cover the backward pass too: the chunked loss recomputes the vocab-parallel
        # cross-entropy there.
        with loss_parallel():
            super().backward(loss, *args, **kwargs)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.optimizer_config)
        scheduler = build_scheduler(
            optimizer,
            self.schedule_config,
            lr=self.optimizer_config.lr,
            total_steps=self.trainer.estimated_stepping_batches,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm=None,
    ) -> None:
        # Lightning's clipping runs one foreach norm over all gradients, which fails when they live on
        # different device meshes (TP-sharded matrices and data-parallel-only norms).
        if gradient_clip_val and not self._step_skipped:
            if gradient_clip_algorithm not in (None, "norm"):
                raise UserError("trainer.gradient_clip_algorithm must be 'norm' for this model")
            grad_norm = clip_grad_norm_(self.model.parameters(), gradient_clip_val)
            self.log("train/grad_norm", grad_norm)

    # ------------------------------------------------------------------ checkpoints
    def check_resumable(self, saved_hparams: dict[str, Any], path: Path) -> None:
        """Before a checkpoint loads: its adapters resume only into the same LoRA layout (a full checkpoint
        only into a full run); the base comes from model.pretrained, not from the checkpoint."""
        saved = saved_hparams.get("lora")
        # Where the adapters started (model.lora.adapter) does not matter once they are in the checkpoint.
        saved = None if saved is None else dataclasses.replace(_settings(LoRAConfig, saved), adapter=None)
        current = None if self.lora_config is None else dataclasses.replace(self.lora_config, adapter=None)
        if saved != current:
            raise UserError(
                f"{path}: saved with model.lora={_describe(saved)}, but this run has model.lora="
                f"{_describe(self.lora_config)}; resume with the checkpoint's model.lora (a full checkpoint starts "
                "a LoRA run once exported to an HF folder and given as model.pretrained)"
            )
        if saved is not None and saved_hparams.get("pretrained") != self.hparams.pretrained:
            rank_zero_warn(
                f"{path}: its adapters were trained over model.pretrained={saved_hparams.get('pretrained')}; "
                f"this run loads {self.hparams.pretrained} as their base"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The resolved architecture travels with the checkpoint, so `export` needs nothing else.
        checkpoint["mistral_config"] = dataclasses.asdict(self.config)
        # Rank 0's random states (only rank 0 writes the metadata; all ranks are seeded alike), as
        # plain data so that the metadata loads with weights_only=True.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is not None:
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(states["python"])
