"""``glmv`` command line: ask a question about an image.

    glmv ask IMAGE "question" [--stream] [--url HOST:PORT] [--protocol grpc|http]
             [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--no-thinking]
             [--show-reasoning] [--timeout SEC]

Exit status: 0 answered, 2 invalid request, 3 server error, 4 timeout, 5 unreachable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .client import DEFAULT_PORTS, Client
from .errors import InvalidRequestError, RequestTimeoutError, ServerError, ServerUnavailableError
from .results import Delta, Finish


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmv", description="Ask GLM-4.6V-Flash about an image via Triton.")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="ask a question about an image")
    ask.add_argument("image", help="image file path or data: URI ('-' for none)")
    ask.add_argument("question")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--url", default=None, help="Triton address (default localhost:8001 grpc, :8000 http)")
    ask.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    ask.add_argument("--model", default="ensemble")
    ask.add_argument("--max-tokens", type=int, default=512)
    ask.add_argument("--temperature", type=float, default=None)
    ask.add_argument("--top-p", type=float, default=None)
    ask.add_argument("--top-k", type=int, default=None)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ask.add_argument("--no-thinking", action="store_true", help="ask the model to answer without thinking")
    ask.add_argument("--show-reasoning", action="store_true", help="print the reasoning to stderr")
    ask.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = args.url or f"localhost:{DEFAULT_PORTS[args.protocol]}"
    images = [] if args.image == "-" else [args.image]
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "enable_thinking": False if args.no_thinking else None,
    }
    try:
        with Client(url, protocol=args.protocol, timeout=args.timeout, model=args.model) as client:
            if args.stream:
                finish = None
                for item in client.stream(images, args.question, **sampling):
                    if isinstance(item, Delta):
                        if item.reasoning and args.show_reasoning:
                            print(item.reasoning, end="", file=sys.stderr, flush=True)
                        if item.text:
                            print(item.text, end="", flush=True)
                    elif isinstance(item, Finish):
                        finish = item
                print()
                if finish is not None:
                    _print_stats(finish.finish_reason, finish.usage, finish.timings)
            else:
                result = client.analyze(images, args.question, **sampling)
                if args.show_reasoning and result.reasoning:
                    print(result.reasoning, file=sys.stderr)
                print(result.text)
                _print_stats(result.finish_reason, result.usage, result.timings)
    except InvalidRequestError as exc:
        print(f"glmv: invalid request: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"glmv: server error: {exc.message}", file=sys.stderr)
        return 3
    except RequestTimeoutError as exc:
        print(f"glmv: timeout: {exc}", file=sys.stderr)
        return 4
    except ServerUnavailableError as exc:
        print(f"glmv: unreachable: {exc}", file=sys.stderr)
        return 5
    return 0


def _print_stats(finish_reason, usage, timings) -> None:  # noqa: ANN001
    ttft = "-" if timings.ttft is None else f"{timings.ttft * 1000:.0f} ms"
    print(
        f"[finish={finish_reason} prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens} ttft={ttft} total={timings.total * 1000:.0f} ms]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
