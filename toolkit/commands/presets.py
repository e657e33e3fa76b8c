"""`toolkit presets`: the GPT-2 model presets (toolkit/presets.py) and their parameter counts."""

from __future__ import annotations

from toolkit.args.ranges import check_ranges
from toolkit.errors import OneLineArgumentParser, exit_on_user_error
from toolkit.presets import GPT2_VOCAB_SIZE, PRESETS, count_parameters, pad_vocab


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="toolkit presets", description="List the GPT-2 model presets.")
    parser.add_argument("--vocab_size", type=int, default=GPT2_VOCAB_SIZE,
                        help="tokenizer size (default: GPT-2's 50257)")
    parser.add_argument("--pad_vocab_to_multiple_of", type=int, default=64,
                        help="pad the embedding rows to a multiple of this (1 = the exact vocabulary)")
    args = parser.parse_args(argv)
    check_ranges(args, command="toolkit presets")
    vocab = pad_vocab(args.vocab_size, args.pad_vocab_to_multiple_of)
    print(f"{'preset':<12} {'n_layer':>7} {'n_head':>6} {'n_embd':>6} {'n_pos':>5} "
          f"{'params (vocab ' + str(vocab) + ')':>24}")
    for name, f in PRESETS.items():
        n = count_parameters(f["n_layer"], f["n_embd"], vocab, f["n_positions"])
        print(f"{name:<12} {f['n_layer']:>7} {f['n_head']:>6} {f['n_embd']:>6} {f['n_positions']:>5} {n:>24,}")
    return 0
