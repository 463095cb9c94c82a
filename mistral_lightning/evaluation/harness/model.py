"""lm-evaluation-harness's `LM` over our Mistral and Tokenizer, registered with lm-eval as "mistral-lightning".

loglikelihood: lm-eval's own TemplateLM splits each (context, continuation) into tokens; requests are
sorted longest first and batched as lm-eval's `hf` model does (its Collator, which also scores all
one-token answers of a shared context with one forward), right-padded, and only the continuation
positions go through the LM head. loglikelihood_rolling: the text after one BOS, in lm-eval's disjoint
windows of the model's context. generate_until: our KV-cache decoding, each row stopped at EOS, at a stop
string or after max_gen_toks. The model's own forward keeps the sliding window. Under torchrun each rank
holds one replica; lm-eval splits the requests by `rank`/`world_size` and gathers through the methods below.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from torch import nn
from tqdm import tqdm

from mistral_lightning.distributed import rank_and_world_size
from mistral_lightning.errors import UserError
from mistral_lightning.evaluation.ranks import init_distributed
from mistral_lightning.generation import stream_generate
from mistral_lightning.generation.loading import load_for_inference
from mistral_lightning.generation.settings import InferenceSettings
from mistral_lightning.generation.text_stream import StopTextStream
from mistral_lightning.option_values import AUTO_DTYPE
from mistral_lightning.tokenizer import Tokenizer

MODEL_NAME = "mistral-lightning"
# Right padding of a loglikelihood batch: causal attention keeps it out of every real position.
_PAD_ID = 0
# Generation options of lm-eval tasks that our sampling implements; any other is named in a warning.
_SAMPLING_OPTIONS = {"do_sample", "temperature", "top_k", "top_p"}

log = logging.getLogger(__name__)

# (the strings, for lm-eval's cache; context ids; continuation ids)
Request = tuple[tuple[str, str] | None, list[int], list[int]]


class HarnessOptionError(UserError):
    """A model_args value that this model cannot use."""


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise HarnessOptionError(
            f"model_args {name}={value!r}: expected a positive integer (batch_size=auto is not supported)"
        )
    return number


@register_model(MODEL_NAME)
class MistralLightningLM(TemplateLM):
    """Score and generate with a loaded model; `from_checkpoint` loads one (what lm-eval's --model_args do)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        batch_size: int | str = 8,
        max_gen_toks: int | str = 256,
        add_bos_token: bool = True,
        prefill_chunk_size: int | None = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.add_bos_token = bool(add_bos_token)
        self.prefill_chunk_size = prefill_chunk_size
        self.checkpoint = checkpoint
        self._device = next(model.parameters()).device
        self._rank, self._world_size = rank_and_world_size()

    # ------------------------------------------------------------------ construction from model_args
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        *,
        tokenizer: str | None = None,
        adapter: str | None = None,
        dtype: str = AUTO_DTYPE,
        device: str | None = None,
        trust_checkpoint: bool = False,
        **options: Any,
    ) -> MistralLightningLM:
        """Load `checkpoint` (HF folder or `fit` checkpoint, with a PEFT LoRA `adapter` folder merged in) on
        `device`, LOCAL_RANK's under torchrun."""
        device = init_distributed(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, text_tokenizer = load_for_inference(
            InferenceSettings(str(checkpoint), adapter, tokenizer, device, str(dtype), trust_checkpoint)
        )
        return cls(model, text_tokenizer, checkpoint=str(checkpoint), **options)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> MistralLightningLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> MistralLightningLM:
        """lm-eval's model_args, over its own batch_size and device options (max_batch_size is not used).

        lm-eval's command line passes device cuda:0 unless told otherwise; like its hf model, a CUDA device
        this machine lacks then gives way to the default (a device named in model_args is used as named).
        """
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        extra.pop("max_batch_size", None)
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            log.info("no CUDA device here; %s runs on the CPU", MODEL_NAME)
            extra.pop("device")
        options = {**extra, **arg_dict}
        known = {"checkpoint", "tokenizer", "adapter", "dtype", "device", "trust_checkpoint", "batch_size"}
        known |= {"max_gen_toks", "add_bos_token", "prefill_chunk_size"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise HarnessOptionError(
                f"model_args {', '.join(unknown)}: unknown to {MODEL_NAME}; it takes {', '.join(sorted(known))}"
            )
        if "checkpoint" not in options:
            raise HarnessOptionError(
                f"model_args needs checkpoint=<HF folder or fit checkpoint> for {MODEL_NAME}"
            )
        return cls.from_checkpoint(**options)

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path).replace("/", "__")

    def get_model_info(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "tokenizer": str(self.tokenizer.path),
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """BOS (when add_bos_token, or as add_special_tokens says) and the text's ids."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bos)

    # ------------------------------------------------------------------ data parallelism
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        shards = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(shards, tensor)
        return torch.stack(shards) if tensor.dim() == 0 else torch.cat(shards)

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        if self.world_size <= 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _continuation_logprobs(self, rows: list[list[int]], lengths: list[int]) -> list[torch.Tensor]:
        """For each row, float32 log-probabilities [length, V] of the tokens after its last `length` inputs."""
        longest = max(len(row) for row in rows)
        ids = torch.full((len(rows), longest), _PAD_ID, dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        hidden = self.model.hidden_states(ids.to(self._device))
        picked = torch.cat(
            [
                hidden[index, len(row) - length : len(row)]
                for index, (row, length) in enumerate(zip(rows, lengths))
            ]
        )
        logprobs = torch.log_softmax(self.model.lm_head(picked).float(), dim=-1)
        return list(logprobs.split(lengths))

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any):
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request."""
        collator = Collator(
            requests,
            sort_fn=lambda request: (-len(request[1] + request[2]), tuple(request[1] + request[2])),
            group_by="contexts",
            group_fn=lambda request: request[1] + request[2][:-1],
        )
        results: list[tuple[float, bool]] = []
        progress = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood requests"
        )
        for batch in collator.get_batched(n=self.batch_size):
            # Too long for the context: keep the end, as lm-eval's hf model does.
            rows = [
                (context + continuation)[-(self.max_length + 1) :][:-1] for _, context, continuation in batch
            ]
            scored = self._continuation_logprobs(rows, [len(continuation) for _, _, continuation in batch])
            for (strings, context, continuation), logprobs in zip(batch, scored):
                for strings_, tokens, logprobs_ in collator.get_cache(
                    req_str=strings, cxt_toks=context, cont_toks=continuation, logits=logprobs[None]
                ):
                    target = torch.tensor(tokens, device=logprobs_.device)
                    logprobs_ = logprobs_[0, -len(tokens) :]
                    greedy = bool((logprobs_.argmax(dim=-1) == target).all())
                    answer = (float(logprobs_.gather(1, target[:, None]).sum()), greedy)
                    results.append(answer)
                    if strings_ is not None:
                        self.cache_hook.add_partial("loglikelihood", strings_, answer)
                    progress.update(1)
        progress.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood after one BOS, every token predicted once from up to max_length before it."""
        windows: list[Request] = []
        owners: list[int] = []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context; the text ends before the first stop string (`until`), EOS or max_gen_toks."""
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        results: list[str] = []
        progress = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until requests"
        )
        for batch in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*batch)
            options = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            # EOS stops a row as a token; an empty stop string would cut every text at its start.
            until = [stop for stop in handle_stop_sequences(options.pop("until", None), eos=None) if stop]
            max_gen_toks = options.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise HarnessOptionError(
                    f"max_gen_toks {max_gen_toks} leaves no room for a context in the model's {self.max_length} "
                    "tokens; lower it in the task's generation_kwargs"
                )
            # Keep the end of a context that leaves no room for max_gen_toks, as lm-eval's hf model does.
            prompts = [self.tok_encode(context)[-(self.max_length - max_gen_toks) :] for context in contexts]
            for context, kwargs, text in zip(
                contexts, all_kwargs, self._generate(prompts, until, max_gen_toks, options)
            ):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _generate(
        self, prompts: list[list[int]], until: list[str], max_gen_toks: int, options: dict
    ) -> list[str]:
        ignored = sorted(set(options) - _SAMPLING_OPTIONS)
        if ignored:
            log.warning("%s ignores the generation options %s", MODEL_NAME, ", ".join(ignored))
        sampling = options.get("do_sample", False)
        streams = [StopTextStream(self.tokenizer, until) for _ in prompts]
        steps = stream_generate(
            self.model,
            prompts,
            max_gen_toks,
            temperature=float(options.get("temperature") or 0.0) if sampling else 0.0,
            top_k=options.get("top_k") if sampling else None,
            top_p=options.get("top_p") if sampling else None,
            eos_id=self.tokenizer.eos_id,
            prefill_chunk_size=self.prefill_chunk_size,
        )
        for step in steps:
            for stream, token in zip(streams, step):
                if token is not None and token != self.tokenizer.eos_id:
                    stream.add(token)
            if all(stream.stopped or token is None for stream, token in zip(streams, step)):
                break
        return [postprocess_generated_text(stream.text, until, None) for stream in streams]
