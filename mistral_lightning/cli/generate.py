"""`mistral-lightning generate`: continue a prompt, answer one chat turn, or chat on stdin.

Stop strings are checked on the decoded text as tokens arrive; text is printed as it is
generated, holding back anything that could still turn out to be the start of a stop string
(generation/text_stream.py, shared with the server). The parser is torch-free, so `--help` is quick;
the model stack is imported after parsing.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from mistral_lightning.cli.options import DefaultsHelpFormatter, add_model_arguments, inference_settings

if TYPE_CHECKING:
    from mistral_lightning.model import Mistral
    from mistral_lightning.tokenizer import Tokenizer

RESET_COMMAND = "/reset"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning generate",
        description="Generate text with a Mistral checkpoint (greedy by default).",
        formatter_class=DefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", help="text to continue; with --chat, the user's message")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="encode the prompt in the tokenizer's Mistral chat format (mistral-common); without --prompt, chat "
        f"interactively (one turn per stdin line, {RESET_COMMAND} forgets the conversation, an empty line or "
        "EOF ends it)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only; default: all")
    parser.add_argument(
        "--top-p", type=float, help="sample among the likeliest tokens holding this probability; default: all"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling (temperature > 0)")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    parser.add_argument(
        "--prefill-chunk-size", type=int, help="prompt tokens per forward pass; default: the whole prompt"
    )
    return parser


def stream_generate(*args, **kwargs):
    """generation.decoding.stream_generate, imported when first called, as it loads torch."""
    from mistral_lightning.generation.decoding import stream_generate as decode

    return decode(*args, **kwargs)


def stream_completion(
    model: Mistral,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    args: argparse.Namespace,
    out: TextIO,
) -> str:
    """Generate for one prompt, writing text to `out` as it comes; returns the completion (stop string cut)."""
    import torch

    from mistral_lightning.generation.text_stream import StopTextStream

    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    text = StopTextStream(tokenizer, args.stop)
    steps = stream_generate(
        model,
        [prompt_ids],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=tokenizer.eos_id,
        generator=generator,
        prefill_chunk_size=args.prefill_chunk_size,
    )
    for position, step in enumerate(steps):
        if position == 0 and step[0] == tokenizer.eos_id:
            print(
                f"note: the model's first token was end-of-text (id {step[0]}), so it generated nothing; "
                "try another prompt"
                + ("" if args.chat else ", or --chat for an instruction-tuned model")
                + ", or sampling (--temperature 0.7)",
                file=sys.stderr,
            )
        out.write(text.add(step[0]))
        out.flush()
        if text.stopped:
            break
    out.write(text.finish() + "\n")
    out.flush()
    return text.text


def chat_loop(
    model: Mistral, tokenizer: Tokenizer, args: argparse.Namespace, lines: TextIO, out: TextIO
) -> None:
    """Read user turns from `lines`, answer each with the whole conversation as context."""
    from mistral_lightning.generation.sampling import GenerationError
    from mistral_lightning.prompts import encode_chat_prompt

    messages: list[dict] = []
    interactive = lines.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line.strip():
            return
        if line.strip() == RESET_COMMAND:
            messages.clear()
            continue
        messages.append({"role": "user", "content": line.strip()})
        try:
            prompt_ids = encode_chat_prompt(tokenizer, messages)
            reply = stream_completion(model, tokenizer, prompt_ids, args, out)
        except GenerationError as error:
            messages.pop()
            print(f"error: {error}; type {RESET_COMMAND} to start a new conversation", file=sys.stderr)
            continue
        if reply.strip():
            messages.append({"role": "assistant", "content": reply.strip()})
        else:
            messages.pop()  # no answer to record; keep the roles alternating


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is None and not args.chat:
        parser.error("give --prompt TEXT to continue a text, or --chat to chat interactively")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty; give the text to continue")
    from mistral_lightning.generation.loading import load_for_inference, resolve_device
    from mistral_lightning.generation.sampling import GenerationError
    from mistral_lightning.prompts import encode_chat_prompt

    if "" in args.stop:
        raise GenerationError('--stop "" would stop before the first character; give a non-empty stop string')
    args.device = resolve_device(args.device)
    model, tokenizer = load_for_inference(inference_settings(args))
    if args.prompt is None:
        chat_loop(model, tokenizer, args, sys.stdin, sys.stdout)
    else:
        if args.chat:
            prompt_ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
        else:
            prompt_ids = tokenizer.encode(args.prompt, bos=True)
        stream_completion(model, tokenizer, prompt_ids, args, sys.stdout)
    return 0
