"""``m2rnn-generate``: stream a continuation of a prompt from a checkpoint of ``m2rnn-train``.

    m2rnn-generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 200 \\
        --temperature 0.8 --top-p 0.95 --seed 0
"""

import argparse
import sys

from m2rnn_jax.generation import ByteDecoder, Generator, check_sampling, encode
from train.checkpointing import restore_for_inference


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="m2rnn-generate", description="Continue a prompt with a trained HybridLM "
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
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        sys.exit("m2rnn-generate: --max-new-tokens must be >= 1")
    stop_tokens = []
    for text in args.stop:
        encoded = encode(text)
        if len(encoded) != 1:
            sys.exit(f"m2rnn-generate: --stop {text!r} must be a single one-byte character")
        stop_tokens.append(encoded[0])
    prompt = encode(args.prompt)
    if not prompt:
        sys.exit("m2rnn-generate: --prompt must not be empty")

    config, model = restore_for_inference(args.checkpoint, step=args.step)
    if config.vocab_size < 256:
        sys.exit(f"m2rnn-generate: the model's vocab_size {config.vocab_size} is below 256, so it "
                 f"was not trained on byte-level tokens")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, config.vocab_size)
    except ValueError as err:
        sys.exit(f"m2rnn-generate: {err}")

    decoder = ByteDecoder()
    out = sys.stdout

    def stream(step, tokens, emitted):
        if emitted[0]:
            out.write(decoder(tokens[:1]))
            out.flush()

    out.write(args.prompt)
    out.flush()
    Generator(model).generate([prompt], args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop_tokens=stop_tokens, callback=stream)
    out.write(decoder.flush() + "\n")
    out.flush()


if __name__ == "__main__":
    main()
