"""``m2rnn-generate``: stream a continuation of a prompt from a checkpoint of ``m2rnn-train``.

    m2rnn-generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 200 \\
        --temperature 0.8 --top-p 0.95 --seed 0

Errors (a folder without a restorable checkpoint, bad arguments) are reported in one line
(``--debug`` shows the traceback).
"""

import argparse
import sys

from m2rnn_jax.generation import ByteDecoder, Generator, check_sampling, encode
from train import compile_cache
from train.checkpointing import restore_for_inference
from train.errors import UserError, add_debug_flag, run_command

PROG = "m2rnn-generate"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog=PROG, description="Continue a prompt with a trained HybridLM "
        "(byte-level tokens), streaming the text as it is generated.")
    parser.add_argument("--checkpoint", required=True,
                        help="the --out folder of m2rnn-train (its newest readable checkpoint)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], metavar="CHAR",
                        help="stop at this one-byte character (repeatable), e.g. --stop $'\\n'")
    compile_cache.add_flag(parser)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(PROG, args.debug, lambda: generate(args))


def _encode_argument(text, flag) -> list:
    try:
        return encode(text)
    except UnicodeEncodeError:
        # The shell passed bytes that are not UTF-8 (Python keeps them as surrogates).
        raise UserError(f"{flag} is not valid UTF-8 text") from None


def generate(args):
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    stop_tokens = []
    for text in args.stop:
        encoded = _encode_argument(text, "--stop")
        if len(encoded) != 1:
            raise UserError(f"--stop {text!r} must be a single one-byte character")
        stop_tokens.append(encoded[0])
    prompt = _encode_argument(args.prompt, "--prompt")
    if not prompt:
        raise UserError("--prompt must not be empty")

    compile_cache.enable(args.compile_cache)
    config, model = restore_for_inference(args.checkpoint, step=args.step)
    if config.vocab_size < 256:
        raise UserError(f"the model's vocab_size {config.vocab_size} is below 256, so it was "
                        f"not trained on byte-level tokens")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, config.vocab_size)
    except ValueError as err:
        raise UserError(str(err)) from err

    decoder = ByteDecoder()
    out = sys.stdout

    def stream(step, tokens, emitted):
        if emitted[0]:
            out.write(decoder(tokens[:1]))
            out.flush()

    out.write(args.prompt)
    out.flush()
    generator = Generator(model)
    del model  # the generator holds what it needs (its own copies of the projection weights)
    generator.generate([prompt], args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop_tokens=stop_tokens, callback=stream)
    out.write(decoder.flush() + "\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
