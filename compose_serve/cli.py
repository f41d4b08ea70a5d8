"""``compose-serve``: the command line.

    compose-serve serve [--config FILE|NAME ...] [--in-process] [--address RAY] [--port 8000]
    compose-serve train --task NAME --out DIR          (a LoRA specialist on generated task data)
    compose-serve train-imsm --task NAME --out DIR     (IMSM: adapter + gate jointly)
    compose-serve merge --method ... --out DIR         (weight-merged baselines)
    compose-serve fit-router --config FILE|NAME --task NAME|--examples MEMBER=FILE.jsonl ... --out DIR
                             [--layer L | --layers L1,L2] [--pooling mean|last]  (a routed composition's router)
    compose-serve generate --config FILE|NAME --prompt TEXT [--chat] [--max-tokens N]
                           [--temperature T] [--seed S] [--top-logprobs K] [--weights a=0.3,b=0.7] [--json]

Results go to stdout (the text, or with ``--json`` one JSON object: text, token ids, and per step
the chosen token's fused log-prob, the top-K fused log-probs and the per-member diagnostics);
progress and timing go to stderr. Errors print one line naming the field and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .errors import ComposeError

logger = logging.getLogger("compose_serve")


def _weights(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights takes name=w,name=w, got {text!r}") from None


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate one completion with a composition")
    p.add_argument("--config", default="default", help="composition YAML, or a built-in name (default)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--top-logprobs", type=int, default=0)
    p.add_argument("--weights", type=_weights, default=None, help="per-request member weights, a=0.3,b=0.7")
    p.add_argument("--json", action="store_true", help="print one JSON object with every step")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from .composition import build_composition
    from .config import load_composition
    from .engine import Engine, Request
    from .sampling import SamplingParams

    spec = load_composition(args.config)
    started = time.perf_counter()
    composition = build_composition(spec)
    loaded = time.perf_counter()
    tokenizer = composition.tokenizer
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, logprobs=args.top_logprobs)
    request = Request(prompt_ids, params, composition={"weights": args.weights} if args.weights else None)
    engine = Engine(composition, max_batch=1)
    engine.check(request)
    stream = not args.json and sys.stdout.isatty()
    out = engine.generate([request], on_event=(lambda e: print(e.text, end="", flush=True)) if stream else None)[0]
    done = time.perf_counter()
    n = len(out.token_ids)
    print(f"[{spec.name}] loaded in {loaded - started:.1f} s; {n} tokens in {done - loaded:.2f} s "
          f"({n / max(done - loaded, 1e-9):.1f} tokens/s), finish_reason={out.finish_reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(completion_json(spec.name, out, tokenizer), ensure_ascii=False))
    elif not stream:
        print(out.text)
    else:
        print()
    return 0


def completion_json(name: str, out, tokenizer) -> dict:
    """The ``--json`` shape: text, ids, and one entry per step."""
    steps = []
    for i, token in enumerate(out.token_ids):
        step = {"token_id": token, "token": tokenizer.decode([token]), "logprob": out.logprobs[i],
                "diagnostics": out.diagnostics[i]}
        if out.top_logprobs:
            step["top_logprobs"] = [{"token_id": t, "token": tokenizer.decode([t]), "logprob": lp}
                                    for t, lp in out.top_logprobs[i]]
        steps.append(step)
    return {"model": name, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "usage": {"prompt_tokens": len(out.prompt_ids), "completion_tokens": len(out.token_ids)},
            "steps": steps}


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve compositions over the OpenAI HTTP API")
    p.add_argument("--config", nargs="+", default=["default"],
                   help="composition YAML files or built-in names, several served at once (default)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL is printed)")
    p.add_argument("--in-process", action="store_true",
                   help="uvicorn in this process, no Ray (default: Ray Serve on a local Ray instance)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. ray://host:10001 or auto) instead of starting one")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $COMPOSE_SERVE_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=None, help="running sequences per composition")
    p.add_argument("--max-queue", type=int, default=None, help="waiting requests before HTTP 429")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request (default none)")
    p.add_argument("--max-body-mb", type=float, default=16.0,
                   help="largest request body in MiB; larger ones get HTTP 413 (default 16)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op threads of the engine (default: one per core but one, on CPU)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import os

    api_key = args.api_key if args.api_key is not None else os.environ.get("COMPOSE_SERVE_API_KEY") or None
    if not args.in_process:
        from .deployments.run import serve_on_ray

        engine = {"max_batch": args.max_batch, "max_queue": args.max_queue,
                  "request_timeout": args.request_timeout, "torch_threads": args.torch_threads}
        serve_on_ray(args.config, host=args.host, port=args.port, address=args.address, api_key=api_key,
                     engine_options={k: v for k, v in engine.items() if v is not None},
                     max_body_bytes=int(args.max_body_mb * 2**20))
        return 0
    from .http.server import run_server

    return run_server(args.config, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch,
                      max_queue=args.max_queue, request_timeout=args.request_timeout,
                      torch_threads=args.torch_threads, log_level="info" if args.verbose else "warning",
                      max_body_bytes=int(args.max_body_mb * 2**20))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compose-serve", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_serve(sub)
    from .merge import add_merge
    from .train.commands import add_train
    from .train.distill import add_distill
    from .train.imsm import add_train_imsm
    from .train.router import add_fit_router

    add_train(sub)
    add_train_imsm(sub)
    add_merge(sub)
    add_distill(sub)
    add_fit_router(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ComposeError as exc:
        where = f" ({exc.param})" if exc.param else ""
        print(f"compose-serve: error{where}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
