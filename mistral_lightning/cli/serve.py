"""`mistral-lightning serve`: an OpenAI-compatible server (chat completions and completions) on LitServe."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from mistral_lightning.cli.options import DefaultsHelpFormatter, add_model_arguments, inference_settings
from mistral_lightning.errors import UserError

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the addresses LitServe binds
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class ServeError(UserError):
    """The server cannot start: LitServe is missing, or the model worker failed to load the model."""


def _port(text: str) -> int:
    if not text.isdigit() or not 1024 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 1024 to 65535")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning serve",
        description="Serve a checkpoint over the OpenAI API: POST /v1/chat/completions (in the model's own "
        "mistral-common chat format) and /v1/completions, streaming or not; GET /v1/models, /health.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--host", choices=HOSTS, default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port to listen on")
    parser.add_argument(
        "--max-batch-size",
        type=_positive,
        default=4,
        help="greedy requests arriving together decode as one batch of at most this many",
    )
    parser.add_argument(
        "--batch-timeout", type=float, default=0.05, help="seconds to wait for more requests to fill a batch"
    )
    parser.add_argument(
        "--prefill-chunk-size",
        type=_positive,
        help="prompt tokens per forward pass; default: the whole prompt",
    )
    parser.add_argument(
        "--served-model-name", help="the model name in responses; default: the checkpoint's name"
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="the web server's log level")
    return parser


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_timeout < 0:
        raise ServeError(f"--batch-timeout {args.batch_timeout:g}: give a number of seconds >= 0")
    try:
        import litserve as ls
    except ImportError:
        raise ServeError("serve needs LitServe: pip install 'mistral-lightning[serve]'") from None
    from mistral_lightning.adapters.merge import with_adapters
    from mistral_lightning.devices import check_device_available
    from mistral_lightning.generation.loading import load_tokenizer, open_weights, resolve_device
    from mistral_lightning.serving.api import MistralAPI, ModelSettings
    from mistral_lightning.serving.responses import add_error_handlers
    from mistral_lightning.serving.spec import OpenAIEndpoints

    # The device, weights, adapter and tokenizer are checked here (the worker loads them again), so a
    # mistake is one line before anything starts; the HTTP process needs the context length and tokenizer.
    loading = inference_settings(args, resolve_device(args.device))
    check_device_available(loading.device, "--device")
    weights = with_adapters(open_weights(Path(loading.checkpoint), loading.trust_checkpoint), loading.adapter)
    config = weights.config
    weights.close()
    tokenizer = load_tokenizer(
        loading.tokenizer,
        loading.checkpoint,
        vocab_size=config.vocab_size,
        trust_checkpoint=loading.trust_checkpoint,
    )
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    settings = ModelSettings(loading, args.prefill_chunk_size)
    spec = OpenAIEndpoints(tokenizer, config.max_seq_length, name)
    api = MistralAPI(settings, spec, args.max_batch_size, args.batch_timeout)
    # accelerator "cpu": one worker, which puts the model on --device itself; timeout False: a request
    # waits in the queue as long as decoding the ones before it takes.
    server = ls.LitServer(api, accelerator="cpu", devices=1, timeout=False)
    add_error_handlers(server.app)
    print(f"serving {name} at http://{args.host}:{args.port}/v1 once the model is loaded", file=sys.stderr)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` shuts down as Ctrl-C does
    try:
        server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False)
    except RuntimeError as error:
        if "workers failed to start" not in str(error):
            raise
        raise ServeError(
            f"the model could not be loaded on --device {loading.device}; the reason is above"
        ) from None
    return 0
