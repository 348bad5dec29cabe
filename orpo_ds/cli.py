"""``orpo-ds`` command line: train, eval, export, plan, config (importers).

Works as ``orpo-ds ...``, ``python -m orpo_ds ...``, under ``deepspeed --module orpo_ds ...`` (which
adds ``--local_rank=N``), ``torchrun`` and ``srun``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from orpo_ds.config import ConfigError, load_config
from orpo_ds.data import DataError
from orpo_ds.exit_codes import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_RUN_ERROR


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orpo-ds", description="ORPO training on DeepSpeed")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a YAML config and key=value overrides")
    t.add_argument("--config", help="YAML run config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 loss.beta=0.2")
    v = sub.add_parser("eval", help="held-out preference accuracy, mean log-odds and chosen NLL of a model")
    v.add_argument("--model", required=True, help="transformers model folder (e.g. <output_dir>/final)")
    v.add_argument("--data", required=True, help="preference pairs: jsonl/json/parquet, saved dataset or hub name")
    v.add_argument("--max-length", type=int, default=1024, help="tokens per sequence, as data.max_length")
    v.add_argument("--micro-batch-tokens", type=int, default=8192, help="tokens per packed forward pass")
    v.add_argument("--beta", type=float, default=0.1, help="loss.beta, for the loss and reward figures")
    v.add_argument("--nll-on-prompt", action="store_true", help="count chosen prompt tokens in the NLL")
    v.add_argument("--json", help="also write all metrics to this new JSON file")
    e = sub.add_parser("export", help="write a transformers folder from a training checkpoint")
    e.add_argument("--checkpoint", required=True, help="checkpoints/step-N folder, or a run's output_dir")
    e.add_argument("--out", required=True, help="folder to write: new, empty, or an earlier orpo-ds export "
                   "(replaced atomically)")
    e.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 2GB")
    e.add_argument("--merge", action="store_true",
                   help="LoRA checkpoints: write the model with the adapters merged in (default: the adapter folder)")
    n = sub.add_parser("plan", help="per-GPU memory, fit, limits and step/epoch time of a config on a cluster")
    n.add_argument("--config", required=True, help="YAML run config, as for train")
    n.add_argument("overrides", nargs="*", help="dotted overrides, as for train (e.g. model.name_or_path=llama-3-70b)")
    n.add_argument("--nodes", type=int, default=1)
    n.add_argument("--gpus-per-node", type=int, default=8)
    n.add_argument("--gpu", default="H100", help="H100, H200, A100, or a bf16 peak in TFLOP/s")
    n.add_argument("--gpu-memory-gb", type=float, help="GiB per GPU (default: the named GPU's)")
    n.add_argument("--mfu", type=float, help="model FLOPs utilisation to assume (default 0.40, see the report)")
    n.add_argument("--bandwidth-gbs", type=float,
                   help="per-GPU bus bandwidth in GB/s (default 200 on one node, 40 across nodes)")
    n.add_argument("--reserve-gb", type=float, default=3.0,
                   help="GiB per GPU kept for the CUDA context, NCCL and allocator fragmentation")
    n.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")
    n.add_argument("--write-ds-config", help="write the plan's DeepSpeed JSON (engine settings) to this new file")
    c = sub.add_parser("config", help="import a config users already have (TRL, axolotl) as an orpo-ds YAML")
    csub = c.add_subparsers(dest="importer", required=True)
    for kind, what in (("trl", "a TRL ORPOConfig-style YAML or JSON (with its script's model/dataset/LoRA keys)"),
                       ("axolotl", "an axolotl YAML with rl: orpo")):
        i = csub.add_parser(f"from-{kind}", help=f"read {what}")
        i.add_argument("file", help=f"the {kind} config")
        i.add_argument("--out", help="write the orpo-ds YAML to this new file (default: standard output)")
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


def _stop_during_start_up(signum, frame) -> None:
    """Until the training loop takes the signals over (:class:`orpo_ds.preemption.PreemptionSignal`): no
    step has run, so nothing is lost by stopping now, with the code a requeue expects (75), or 130 for
    Ctrl-C, instead of 143 or a KeyboardInterrupt traceback."""
    code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED
    print(f"orpo-ds: {signal.Signals(signum).name} during start-up, before any training step: stopped, nothing to "
          f"save; rerun the same command to start", file=sys.stderr, flush=True)
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_strip_launcher_args(sys.argv[1:] if argv is None else argv))
    if args.command == "train" and argv is None:  # a process of its own, not a call from Python code
        for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):  # SIGTERM's last: once it is caught, all are
            signal.signal(sig, _stop_during_start_up)
    try:
        if args.command == "train":
            # DeepSpeed's ZeRO-3 calls torch.distributed collectives that torch 2.13 deprecates; the warning
            # was printed on every step of a run here, and tells a user nothing they can act on.
            warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                                    category=FutureWarning)
            cfg = load_config(args.config, args.overrides)
            from orpo_ds.train import run_training

            run_training(cfg)
            return 0
        if args.command == "eval":
            return _eval(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "config":
            return _import_config(args)
        if args.command == "export":
            from orpo_ds.export import export_checkpoint

            out = export_checkpoint(args.checkpoint, args.out, max_shard_size=args.max_shard_size, merge=args.merge)
            print(f"exported to {out}")
            return 0
    except Exception as exc:  # noqa: BLE001 - mapped to documented exit codes below
        return _exit_code_for(exc)
    return 1


def _eval(args: argparse.Namespace) -> int:
    import json

    from orpo_ds.evaluate import HEADLINE, evaluate_model_dir
    from orpo_ds.safe_files import atomic_write, refuse_existing_file

    if args.json:  # checked before the evaluation, which may take long
        refuse_existing_file(args.json, "--json")
    metrics = evaluate_model_dir(args.model, args.data, max_length=args.max_length,
                                 micro_batch_tokens=args.micro_batch_tokens, beta=args.beta,
                                 nll_on_prompt=args.nll_on_prompt)
    for key, label in HEADLINE.items():
        print(f"{label:>20}: {metrics[key]:.4f}")
    if args.json:
        atomic_write(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from orpo_ds.plan import Cluster, make_plan
    from orpo_ds.plan.render import render, sbatch_line

    cfg = load_config(args.config, args.overrides)
    cluster = Cluster.of(args.gpu, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         memory_gib=args.gpu_memory_gb, bandwidth_gbs=args.bandwidth_gbs)
    plan = make_plan(cfg, cluster, mfu=args.mfu, reserve_gib=args.reserve_gb)
    if args.write_ds_config:

        from orpo_ds.ds_config import read_ds_config
        from orpo_ds.safe_files import atomic_write, refuse_existing_file

        refuse_existing_file(args.write_ds_config, "--write-ds-config")  # never replace a file the user has
        atomic_write(args.write_ds_config, json.dumps(read_ds_config(cfg.deepspeed.config), indent=2) + "\n")
    if args.json:
        print(json.dumps(plan.to_dict() | {"sbatch": sbatch_line(plan, args.config, args.overrides)}, indent=2))
    else:
        print(render(plan, args.config, args.overrides))
    return 0


def _import_config(args: argparse.Namespace) -> int:
    """The imported YAML on stdout or to a new ``--out`` file; each unmapped key and why on stderr."""
    from orpo_ds.importers import import_config, render
    from orpo_ds.safe_files import atomic_write, refuse_existing_file

    kind = args.importer.removeprefix("from-")
    if args.out:
        refuse_existing_file(args.out, "--out")  # never replace a file the user has
    _, imported = import_config(kind, args.file)  # validated as train would: a bad value exits 2 here
    text = render(imported, kind, args.file)
    if args.out:
        atomic_write(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    for key, why in imported.unmapped.items():
        print(f"unmapped {key}: {why}", file=sys.stderr)
    for key in imported.missing:
        print(f"missing {key}: required, and not in {args.file}; set it in the YAML before training", file=sys.stderr)
    print(f"{len(imported.unmapped)} key(s) not mapped", file=sys.stderr)
    return 0


def _exit_code_for(exc: Exception) -> int:
    from orpo_ds.checkpoint import ResumeError
    from orpo_ds.preemption import Preempted
    from orpo_ds.safe_files import DiskFullError, UnsafeOutputError, is_disk_full
    from orpo_ds.step import NonFiniteLossError

    if isinstance(exc, Preempted):
        print(f"orpo-ds: {exc}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, (ConfigError, DataError, UnsafeOutputError)):
        kind = "config" if isinstance(exc, ConfigError) else "data" if isinstance(exc, DataError) else "output"
        print(f"orpo-ds: {kind} error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if isinstance(exc, (NonFiniteLossError, ResumeError, DiskFullError)):
        print(f"orpo-ds: {exc}", file=sys.stderr)
        return EXIT_RUN_ERROR
    if is_disk_full(exc):  # anywhere else: metrics, exports, the tokenized cache
        where = getattr(exc, "filename", None) or getattr(exc.__cause__, "filename", None)
        print(f"orpo-ds: no space left on device{f' writing {where}' if where else ''} ({exc}); free space, then "
              f"rerun the same command", file=sys.stderr)
        return EXIT_RUN_ERROR
    raise exc


if __name__ == "__main__":
    raise SystemExit(main())
