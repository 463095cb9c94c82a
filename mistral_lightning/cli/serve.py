"""`mistral-lightning serve`: an OpenAI-compatible server (chat completions and completions) on LitServe."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from mistral_lightning.cli.options import DefaultsHelpFormatter, add_model_arguments, inference_settings
from mistral_lightning.errors import UserError

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the addresses LitServe binds
LOOPBACK = "127.0.0.1"
# The Host headers a loopback server answers: a page in a browser that renames its own site to 127.0.0.1
# (DNS rebinding) still sends its own name, and is refused.
LOOPBACK_NAMES = ["127.0.0.1", "localhost"]
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
API_KEY_ENV = "MISTRAL_LIGHTNING_API_KEY"
DEFAULT_MAX_REQUEST_BYTES = 2**20


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
        "--served-model-name",
        help="the model name requests must give (others get 404) and responses carry; default: the "
        "checkpoint's folder name",
    )
    parser.add_argument(
        "--api-key",
        help="the key clients must send as `Authorization: Bearer <key>` (OpenAI clients' api_key); default: "
        f"${API_KEY_ENV}, else no key (prefer the variable: a command line is visible to other users)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=_positive,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="a larger request body is refused with HTTP 413",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=_positive,
        help="a longer prompt is refused with HTTP 400; default: the model's context",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="the web server's log level")
    return parser


class _ManagerGoneAtShutdown(logging.Filter):
    """LitServe's monitoring thread polls a shutdown flag held by a multiprocessing manager; when SIGTERM stops
    the server, the manager can exit before the thread's last poll, which it logs as a crash (an EOFError from
    the manager's closed connection). That record only says the server is stopping; any other crash is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        gone = record.exc_info is not None and issubclass(record.exc_info[0], (EOFError, ConnectionError))
        return not (gone and record.getMessage() == "Monitoring worker crashed")


def _stop_on_sigterm() -> None:
    """`kill` shuts the server down as Ctrl-C does. LitServe's forked web-server process inherits the handler
    and is stopped with SIGTERM, which uvicorn raises again once it has shut down: that process just exits."""
    server = os.getpid()

    def stop(signum, frame) -> None:
        raise KeyboardInterrupt if os.getpid() == server else SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    logging.getLogger("litserve.server").addFilter(_ManagerGoneAtShutdown())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_timeout < 0:
        raise ServeError(f"--batch-timeout {args.batch_timeout:g}: give a number of seconds >= 0")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise ServeError("--api-key: is empty; give the key clients must send, or leave the option out")
    if args.host != LOOPBACK and api_key is None:
        print(
            f"mistral-lightning serve: warning: --host {args.host} without --api-key: anyone who reaches port "
            f"{args.port} can use the model; set {API_KEY_ENV} (or --api-key)",
            file=sys.stderr,
        )
    try:
        import litserve as ls
    except ImportError:
        raise ServeError("serve needs LitServe: pip install 'mistral-lightning[serve]'") from None
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from mistral_lightning.adapters.merge import with_adapters
    from mistral_lightning.devices import check_device_available
    from mistral_lightning.generation.loading import load_tokenizer, open_weights, resolve_device
    from mistral_lightning.serving.api import MistralAPI, ModelSettings
    from mistral_lightning.serving.requests import PromptLimits
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
    limits = PromptLimits(config.max_seq_length, args.max_prompt_tokens)
    spec = OpenAIEndpoints(tokenizer, limits, name, api_key)
    api = MistralAPI(settings, spec, args.max_batch_size, args.batch_timeout)
    hosts = [(TrustedHostMiddleware, {"allowed_hosts": LOOPBACK_NAMES})] if args.host == LOOPBACK else []
    # accelerator "cpu": one worker, which puts the model on --device itself; timeout False: a request
    # waits in the queue as long as decoding the ones before it takes.
    server = ls.LitServer(
        api,
        accelerator="cpu",
        devices=1,
        timeout=False,
        max_payload_size=args.max_request_bytes,
        middlewares=hosts,
    )
    add_error_handlers(server.app, args.max_request_bytes)
    print(f"serving {name} at http://{args.host}:{args.port}/v1 once the model is loaded", file=sys.stderr)
    _stop_on_sigterm()
    try:
        server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False)
    except RuntimeError as error:
        if "workers failed to start" not in str(error):
            raise
        raise ServeError(
            f"the model could not be loaded on --device {loading.device}; the reason is above"
        ) from None
    return 0
