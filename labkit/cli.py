"""``labkit`` command line: convert torchvision weights, train, evaluate. Logic lives in the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  labkit train configs/embedded/config.fp32.json            # FP32 on the embedded digits (~2 min on a CPU)
  labkit train configs/embedded/config.pact.json            # PACT QAT from runs/embedded-fp32/best.ckpt
  labkit train configs/imagenet/config.fp32.json --data-root /data/ILSVRC12
  torchrun --nproc_per_node 4 -m labkit.cli train configs/imagenet/config.pact.json --data-root /data/ILSVRC12
  labkit convert --output pretrained/mnv2_1.0.ckpt          # from the torch hub cache, or --from FILE
  labkit eval runs/embedded-fp32/best.ckpt
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labkit", description="Quantization-aware training (PACT/SAWB, TQT) of MobileNetV2.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = sub.add_parser(
        "convert", help="torchvision mobilenet_v2 weights -> labkit checkpoint",
        description="Write a labkit MobileNetV2 checkpoint from torchvision weights: a state-dict file (--from) "
                    "or, without --from, torchvision's IMAGENET1K_V1 file in the local torch hub cache "
                    "($TORCH_HOME/hub/checkpoints). Nothing is downloaded.")
    conv.add_argument("--from", dest="source", metavar="FILE", help="torchvision mobilenet_v2 state-dict file "
                      "(e.g. mobilenet_v2-b0353104.pth); default: the torch hub cache")
    conv.add_argument("--output", "-o", required=True, metavar="FILE", help="checkpoint to write (atomically)")
    conv.add_argument("--capacity", type=float, metavar="W", help="width multiplier; default: read from shapes")
    conv.add_argument("--stride-config", default="standard", metavar="NAME",
                      help="stride table of the labkit model: standard (ImageNet) or small (32 px inputs)")

    tr = sub.add_parser(
        "train", help="train a network from a JSON config (FP32, PACT or TQT)",
        description="Train from a QuantLab-shaped JSON config. The run folder gets config.json, history.jsonl "
                    "(one record per epoch), last.ckpt and best.ckpt. Under torchrun it trains with "
                    "DistributedDataParallel; on a GPU with AMP and channels_last.")
    tr.add_argument("config", help="JSON config, e.g. configs/embedded/config.fp32.json")
    tr.add_argument("--output-dir", "-o", metavar="DIR", help="run folder; default: runs/<folder>-<config name>, "
                    "e.g. runs/embedded-fp32")
    tr.add_argument("--epochs", type=int, metavar="N", help="override training.n_epochs")
    tr.add_argument("--resume", action="store_true", help="continue from DIR/last.ckpt if it exists")
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    tr.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet folder with train/ and val/)")
    tr.add_argument("--pretrained", metavar="FILE", help="override network.pretrained (full-precision checkpoint); "
                    "'none' to start from scratch")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key by its dotted path, value as JSON, e.g. "
                         "--set data.train.dataloader.bs=128 (repeatable)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch only)")

    ev = sub.add_parser(
        "eval", help="validation loss/top-1/top-5 of a checkpoint",
        description="Evaluate a run checkpoint on its validation set, with the config stored in it "
                    "(or --config).")
    ev.add_argument("checkpoint", help="checkpoint written by labkit train (last.ckpt / best.ckpt)")
    ev.add_argument("--config", metavar="FILE", help="config to use instead of the one stored in the checkpoint")
    ev.add_argument("--data-root", metavar="DIR", help="override data.root")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def _overrides(args) -> dict:
    from labkit.config import parse_override

    overrides = dict(parse_override(text) for text in getattr(args, "overrides", []))
    if getattr(args, "data_root", None):
        overrides["data.root"] = args.data_root
    if getattr(args, "epochs", None):
        overrides["training.n_epochs"] = args.epochs
    if getattr(args, "pretrained", None):
        overrides["network.pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    return overrides


def cmd_convert(args) -> None:
    from labkit.convert import convert_file

    path, net = convert_file(args.output, args.source, capacity=args.capacity, config=args.stride_config)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"wrote {path}: MobileNetV2 capacity {net.capacity}, {net.num_classes} classes, {n_params:,} parameters")


def cmd_train(args) -> None:
    from labkit.config import load_config
    from labkit.train import train

    cfg = load_config(args.config, _overrides(args))
    out = Path(args.output_dir or Path("runs") / cfg["name"])
    result = train(cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress)
    print(f"final valid top-1 {result['valid']['top1']:.2f}%  (best {result['best_top1']:.2f}%)  -> {out}")


def cmd_eval(args) -> None:
    from labkit.config import load_config
    from labkit.train import evaluate_checkpoint

    cfg = load_config(args.config, _overrides(args)) if args.config else None
    if cfg is None and args.data_root:
        from labkit.checkpoint import load_file
        from labkit.config import resolve_config

        cfg = resolve_config(load_file(args.checkpoint)["config"], _overrides(args))
    m = evaluate_checkpoint(args.checkpoint, cfg, device=args.device)
    print(f"{args.checkpoint}: valid loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  "
          f"({m['n']} images)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from labkit.checkpoint import CheckpointError
    from labkit.config import ConfigError
    from labkit.data import DatasetError

    try:
        {"convert": cmd_convert, "train": cmd_train, "eval": cmd_eval}[args.command](args)
    except (ConfigError, CheckpointError, DatasetError) as err:
        print(f"labkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
