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
  labkit integerize runs/embedded-pact                      # integer twin: per-layer code agreement, size report
  labkit export runs/embedded-tqt -o runs/export-tqt        # network.onnx + inputs.npz/outputs.npz, onnxruntime check
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
    sw = sub.add_parser(
        "sweep", help="run a grid of QAT runs (algorithm x bits x seed) through the training notebook",
        description="Execute notebooks/03_pact_training.ipynb once per grid point with papermill, keep every "
                    "executed notebook, and write results.csv and results.png. A failing run is reported with its "
                    "notebook, cell and error; the others go on.")
    sw.add_argument("grid", nargs="?", metavar="GRID.json",
                    help='grid file, e.g. {"algorithm": ["pact", "tqt"], "bits": [8, 4], "seed": [0]}')
    sw.add_argument("--algorithms", nargs="+", metavar="ALG", help="pact, tqt, ... (configs/<data>/config.<ALG>.json)")
    sw.add_argument("--bits", nargs="+", type=int, metavar="B", help="weight and activation bits of every layer")
    sw.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="training seeds (default 0)")
    sw.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    sw.add_argument("--data", default="embedded", help="config folder: embedded (default) or imagenet")
    sw.add_argument("--data-root", metavar="DIR", help="ImageNet folder (with --data imagenet)")
    sw.add_argument("--output-dir", "-o", default="runs/sweep", metavar="DIR", help="default: runs/sweep")
    sw.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    lab = sub.add_parser(
        "lab", help="the whole flow on the embedded default: FP32 -> PACT -> TQT -> integerize/export",
        description="Execute the lab notebooks in order with papermill (their default parameters: the embedded "
                    "default) and print where the executed notebooks, runs, plots and tables are.")
    lab.add_argument("--output-dir", "-o", default="runs/lab", metavar="DIR",
                     help="where the executed notebooks go (default runs/lab); runs go to runs/embedded-*")
    ig = sub.add_parser(
        "integerize", help="integer network of a PACT/TQT run; per-layer check against fake quantization",
        description="Turn a trained PACT/TQT run into its integer twin (integer weight codes, BN folded into "
                    "per-channel requantizations y = clip(floor((acc*mul + add) / 2^d)), integer adds and pool), run "
                    "both on the validation set and print, per layer, the share of identical codes and the largest "
                    "code difference, the prediction agreement and both top-1s; then the size report.")
    ig.add_argument("run", help="run folder (uses best.ckpt, or last.ckpt when best.ckpt predates quantization) "
                    "or checkpoint file, e.g. runs/embedded-pact")
    ig.add_argument("--d", type=int, metavar="D", help="one requantization shift for every layer (e.g. 24); "
                    "default: the most exact per layer (worst case below 2^53)")
    ig.add_argument("--input-bits", type=int, default=8, metavar="B", help="bits of the input grid (default 8)")
    ig.add_argument("--limit", type=int, metavar="N", help="compare on the first N validation images only")
    ig.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet runs)")
    ig.add_argument("--output-dir", "-o", metavar="DIR", help="also write comparison.csv and size.csv there")

    ex = sub.add_parser(
        "export", help="integer network as network.onnx + inputs.npz/outputs.npz (golden data)",
        description="Integerize a PACT/TQT run and write network.onnx (standard operators: Conv/Gemm with integer "
                    "weights, requantization as Mul-Add-Div-Floor-Clip; --requant-shift: one RequantShift node "
                    "each), inputs.npz (input codes) and outputs.npz (int64 logits) for the first validation images, "
                    "and with --activations every layer's integer output. Then checks the export with onnxruntime.")
    ex.add_argument("run", help="run folder or checkpoint file, e.g. runs/embedded-tqt")
    ex.add_argument("--output-dir", "-o", metavar="DIR", help="export folder; default: <run>/export")
    ex.add_argument("--n-inputs", type=int, default=8, metavar="N", help="validation images in the golden data "
                    "(default 8)")
    ex.add_argument("--requant-shift", action="store_true", help="RequantShift nodes (Deeploy) instead of "
                    "Mul-Add-Div-Floor-Clip; onnxruntime cannot run them, so no check")
    ex.add_argument("--activations", action="store_true", help="also write activations.npz (every layer)")
    ex.add_argument("--d", type=int, metavar="D", help="one requantization shift for every layer; default: "
                    "the most exact per layer")
    ex.add_argument("--input-bits", type=int, default=8, metavar="B", help="bits of the input grid (default 8)")
    ex.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet runs)")
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

    # the run's network.pretrained is not needed (the checkpoint holds the weights): not checked
    cfg = load_config(args.config, _overrides(args), check_files=False) if args.config else None
    if cfg is None and args.data_root:
        from labkit.checkpoint import load_file
        from labkit.config import resolve_config

        cfg = resolve_config(load_file(args.checkpoint)["config"], _overrides(args), check_files=False)
    m = evaluate_checkpoint(args.checkpoint, cfg, device=args.device)
    print(f"{args.checkpoint}: valid loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  "
          f"({m['n']} images)")


def cmd_sweep(args) -> None:
    import json

    from labkit.paths import resolve
    from labkit.sweep import run_sweep

    grid = json.loads(Path(args.grid).read_text()) if args.grid else {}
    if args.algorithms:
        grid["algorithm"] = args.algorithms
    if args.bits:
        grid["bits"] = args.bits
    grid.setdefault("seed", args.seeds)
    table = run_sweep(grid, args.output_dir, epochs=args.epochs, data=args.data, data_root=args.data_root,
                      device=args.device)
    print(table)
    out = resolve(args.output_dir)  # where run_sweep wrote them
    print(f"results: {out / 'results.csv'}, {out / 'results.png'}")


def cmd_lab(args) -> None:
    from labkit.lab import run_notebooks

    executed = run_notebooks(args.output_dir)
    print("executed notebooks (open them in JupyterLab for tables and plots):")
    for path in executed:
        print(f"  {path}")
    print("runs (config, history.jsonl, checkpoints): runs/embedded-fp32, runs/embedded-pact, runs/embedded-tqt")
    print("integer networks and exports (network.onnx, inputs.npz, outputs.npz): runs/integerize")


def _integer_run(args):
    from labkit.data import build_datasets
    from labkit.integerize import integerize_checkpoint

    qnet, inet, cfg = integerize_checkpoint(args.run, input_bits=args.input_bits, d=args.d)
    data = dict(cfg["data"])
    if args.data_root:
        data["root"] = args.data_root
    _, val = build_datasets(data)
    return qnet, inet, cfg, val


def cmd_integerize(args) -> None:
    from torch.utils.data import DataLoader, Subset

    from labkit.integerize import compare
    from labkit.size import size_report

    qnet, inet, _, val = _integer_run(args)
    if args.limit:
        val = Subset(val, range(min(args.limit, len(val))))
    result = compare(qnet, inet, DataLoader(val, batch_size=64))
    sizes = size_report(inet)
    print(result.table())
    print()
    print(sizes)
    print()
    print(result.summary())
    print(f"target (>= 99.99% identical codes in every layer, identical predictions and top-1): "
          f"{'met' if result.ok() else 'NOT met'}")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.table().to_csv(out / "comparison.csv")
        sizes.to_csv(out / "size.csv")
        print(f"wrote {out / 'comparison.csv'} and {out / 'size.csv'}")


def cmd_export(args) -> None:
    import torch

    from labkit.export import check_export, export

    _, inet, _, val = _integer_run(args)
    n = max(1, min(args.n_inputs, len(val)))
    inputs = torch.stack([val[i][0] for i in range(n)])
    run = Path(args.run)
    out = Path(args.output_dir) if args.output_dir else (run if run.is_dir() else run.parent) / "export"
    paths = export(inet, out, inputs, requant_shift=args.requant_shift, activations=args.activations)
    for path in paths.values():
        print(f"wrote {path}")
    if args.requant_shift:
        import onnx

        onnx.checker.check_model(onnx.load(str(paths["network"])))
        print("onnx checker: ok (RequantShift nodes: onnxruntime cannot run them, numbers not checked)")
        return
    check = check_export(out)
    print(f"onnxruntime on {check['samples']} inputs: {'identical to outputs.npz' if check['exact'] else 'DIFFERS'}"
          f" (max |difference| {check['max_abs_diff']}); {check['onnx_nodes']} nodes: {', '.join(check['ops'])}")
    if not check["exact"]:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from labkit.checkpoint import CheckpointError
    from labkit.config import ConfigError
    from labkit.data import DatasetError
    from labkit.integerize import IntegerizeError

    try:
        {"convert": cmd_convert, "train": cmd_train, "eval": cmd_eval, "sweep": cmd_sweep,
         "lab": cmd_lab, "integerize": cmd_integerize, "export": cmd_export}[args.command](args)
    except (ConfigError, CheckpointError, DatasetError, IntegerizeError) as err:
        print(f"labkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
