"""``orpo-ds`` command line: train, eval, export.

Works as ``orpo-ds ...``, ``python -m orpo_ds ...``, under ``deepspeed --module orpo_ds ...`` (which
adds ``--local_rank=N``), ``torchrun`` and ``srun``.
"""

from __future__ import annotations

import argparse
import sys

from orpo_ds.config import ConfigError, load_config
from orpo_ds.data import DataError

EXIT_CONFIG_ERROR = 2  # bad config or bad data, reported without a traceback


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orpo-ds", description="ORPO training on DeepSpeed")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a YAML config and key=value overrides")
    t.add_argument("--config", help="YAML run config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 loss.beta=0.2")
    return p


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_strip_launcher_args(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "train":
            cfg = load_config(args.config, args.overrides)
            from orpo_ds.train import run_training

            run_training(cfg)
            return 0
    except ConfigError as exc:
        print(f"orpo-ds: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except DataError as exc:
        print(f"orpo-ds: data error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
