"""``labkit`` command line: convert, train, evaluate, plan, sweep, the lab, integerize, export.

Logic lives in the library; this module parses arguments, checks paths and configs before the heavy imports
(torch takes seconds to import on a busy machine, a typo should not), and prints every
:class:`labkit.config.errors.LabkitError` as one line with exit status 2 (``--debug`` shows the traceback).
Imports of heavy modules sit inside the command functions for that reason.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from labkit.config.budget import bit_choices, parse_budget
from labkit.config.errors import LabkitError
from labkit.config.loading import load_config, parse_override, read_config_file, resolve_config
from labkit.config.paths import resolve

EPILOG = """examples:
  labkit train configs/embedded/config.fp32.json            # FP32 on the embedded digits (~2 min on a CPU)
  labkit train configs/embedded/config.pact.json            # PACT QAT from runs/embedded-fp32/best.ckpt
  labkit train configs/imagenet/config.fp32.json --data-root /data/ILSVRC12
  torchrun --nproc_per_node 4 -m labkit.cli train configs/imagenet/config.pact.json --data-root /data/ILSVRC12
  labkit convert --output pretrained/mnv2_1.0.ckpt          # from the torch hub cache, or --from FILE
  labkit eval runs/embedded-fp32/best.ckpt
  labkit plan configs/embedded/config.pact.4b.json --budget weight_bytes=uniform:3,act_bytes=uniform:3 -o plan.json
  labkit integerize runs/embedded-pact                      # integer twin: per-layer code agreement, size report
  labkit export runs/embedded-tqt -o runs/export-tqt        # network.onnx + inputs.npz/outputs.npz, onnxruntime check
  labkit export runs/embedded-pact --target deeploy         # RequantShift (int32) for Deeploy's Generic platform
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labkit", description="Quantization-aware training (PACT/SAWB, TQT) of MobileNetV2.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
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
    tr.add_argument("--resume", action="store_true", help="continue the run in DIR from its last.ckpt (same config; "
                    "a larger --epochs extends it where the schedule allows)")
    tr.add_argument("--overwrite", action="store_true", help="replace the run that DIR holds (its config, history "
                    "and checkpoints are deleted first)")
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    tr.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet folder with train/ and val/)")
    tr.add_argument("--pretrained", metavar="FILE", help="override network.pretrained (full-precision checkpoint); "
                    "'none' to start from scratch")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key by its dotted path, value as JSON, e.g. "
                         "--set data.train.dataloader.bs=128 (repeatable)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch only)")
    tr.add_argument("--verbose", action="store_true", help="also print every quantizer's bounds at each controller "
                    "command (always written to the run folder's quantizers.jsonl)")

    ev = sub.add_parser(
        "eval", help="validation loss/top-1/top-5 of a checkpoint",
        description="Evaluate a run checkpoint on its validation set, with the config stored in it "
                    "(or --config).")
    ev.add_argument("checkpoint", help="checkpoint written by labkit train (last.ckpt / best.ckpt)")
    ev.add_argument("--config", metavar="FILE", help="config to use instead of the one stored in the checkpoint")
    ev.add_argument("--data-root", metavar="DIR", help="override data.root")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pl = sub.add_parser(
        "plan", help="propose per-layer bits for a budget (sensitivity + exact allocation) -> a config",
        description="Measure each layer's sensitivity (calibration-loss increase with only that layer quantized, per "
                    "bit-width; cached as sensitivity.json beside the checkpoint), choose the bits that minimise their "
                    "sum under the budget (exact integer program), and write the base config with those bits.")
    pl.add_argument("config", help="PACT/TQT base config, e.g. configs/embedded/config.pact.4b.json (SAWB weights)")
    pl.add_argument("--budget", "-b", action="append", required=True, metavar="METRIC=LIMIT",
                    help="weight_bytes, act_bytes or BOPs at most LIMIT: a number or uniform:B (what every layer at "
                         "B bits costs), e.g. weight_bytes=uniform:3,act_bytes=uniform:3 (repeatable)")
    pl.add_argument("--run", metavar="RUN", help="trained run (folder or .ckpt) whose float weights are measured; "
                    "default: the config's network.pretrained")
    pl.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8], metavar="B",
                    help="bit-widths to measure and choose from (default 2 3 4 8)")
    pl.add_argument("--w-bits", nargs="+", type=int, metavar="B", help="weight bits to choose from (default --bits)")
    pl.add_argument("--a-bits", nargs="+", type=int, metavar="B", help="activation bits to choose (default --bits)")
    pl.add_argument("--calib", type=int, default=256, metavar="N", help="training images to measure on (default 256)")
    pl.add_argument("--output", "-o", required=True, metavar="FILE", help="config to write, e.g. runs/plan/plan.json")
    pl.add_argument("--plot", metavar="FILE.png", help="also draw the sensitivity heat map there")
    pl.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet)")
    sw = sub.add_parser(
        "sweep", help="run a grid of QAT runs (algorithm x bits or budget x seed) through the training notebook",
        description="Execute notebooks/03_pact_training.ipynb once per grid point with papermill, keep every "
                    "executed notebook, and write results.csv (with each plan's weight/activation bytes and BOPs) "
                    "and results.png. A budget point trains the plan labkit plan proposes for it (written to "
                    "plans/). A failing run is reported with its notebook, cell and error; the others go on.")
    sw.add_argument("grid", nargs="?", metavar="GRID.json",
                    help='grid file, e.g. {"algorithm": ["pact", "tqt"], "bits": [8, 4], "seed": [0]}')
    sw.add_argument("--algorithms", nargs="+", metavar="ALG", help="pact, tqt, ... (configs/<data>/config.<ALG>.json)")
    sw.add_argument("--bits", nargs="+", type=int, metavar="B", help="weight and activation bits of every layer")
    sw.add_argument("--budgets", nargs="+", metavar="BUDGET", help="train the proposed plan of each budget (as for "
                    "labkit plan), e.g. weight_bytes=uniform:3,act_bytes=uniform:3")
    sw.add_argument("--plan-bits", nargs="+", type=int, default=[2, 3, 4, 8], metavar="B",
                    help="bits the budget plans choose from (default 2 3 4 8)")
    sw.add_argument("--calib", type=int, default=256, metavar="N", help="calibration images of the budget plans")
    sw.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="training seeds (default 0)")
    sw.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    sw.add_argument("--data", default="embedded", help="config folder: embedded (default) or imagenet")
    sw.add_argument("--data-root", metavar="DIR", help="ImageNet folder (with --data imagenet)")
    sw.add_argument("--output-dir", "-o", default="runs/sweep", metavar="DIR", help="default: runs/sweep")
    sw.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    lab = sub.add_parser(
        "lab", help="the whole flow on the embedded default: FP32 -> PACT -> TQT -> integerize/export",
        description="Execute the lab notebooks in order with papermill (their default parameters: the embedded "
                    "default), printing one line per training epoch, then a results table: FP32/PACT/TQT top-1, "
                    "the integer networks' agreement, and where each run and export is.")
    lab.add_argument("--output-dir", "-o", default="runs/lab", metavar="DIR",
                     help="where the executed notebooks go (default runs/lab); runs go to runs/embedded-*")
    lab.add_argument("--verbose", action="store_true", help="print every line the notebooks print")
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
        "export", help="integer network as network.onnx + inputs.npz/outputs.npz (golden data), for onnxruntime, "
                       "qonnx or Deeploy",
        description="Integerize a PACT/TQT run and write network.onnx for a target, inputs.npz (input codes) and "
                    "outputs.npz (int64 logits) for the first validation images, and with --activations every "
                    "layer's integer output; then check the export with onnxruntime. Targets: onnx (standard "
                    "operators, requantization as Mul-Add-Div-Floor-Clip, symbolic batch), qonnx (the same with the "
                    "batch fixed to --n-inputs and a shape on every tensor, for qonnx's execute_onnx), deeploy "
                    "(the int32 twin: one RequantShift node per requantization, as Deeploy's Generic platform reads "
                    "it; writes int32.csv, the per-layer shifts, bound, headroom, proven error and the share of codes "
                    "identical to the exact twin on the exported images). docs/export.md says which "
                    "tools and versions were run on each.")
    ex.add_argument("run", help="run folder or checkpoint file, e.g. runs/embedded-tqt")
    ex.add_argument("--target", choices=("onnx", "qonnx", "deeploy"), default="onnx",
                    help="onnx (default), qonnx or deeploy")
    ex.add_argument("--output-dir", "-o", metavar="DIR", help="export folder; default: <run>/export[-<target>]")
    ex.add_argument("--n-inputs", type=int, default=8, metavar="N", help="validation images in the golden data "
                    "(default 8; the static batch of the qonnx and deeploy targets)")
    ex.add_argument("--batch", type=int, metavar="B", help="qonnx and deeploy: the network's static batch (default "
                    "--n-inputs; it must divide --n-inputs: the golden data then holds several runs)")
    ex.add_argument("--activations", action="store_true", help="also write activations.npz (every layer)")
    ex.add_argument("--d", type=int, metavar="D", help="one requantization shift for every layer of the exact twin; "
                    "default: the most exact per layer")
    ex.add_argument("--calibrate", type=int, metavar="N", help="deeploy: int32 shifts from the largest values on the "
                    "first N training images times --margin (larger shifts, not proven); default: bounds proven "
                    "for every input")
    ex.add_argument("--margin", type=float, default=2.0, metavar="M", help="deeploy with --calibrate: factor on "
                    "the largest values seen (default 2)")
    ex.add_argument("--max-groups", type=int, default=None, metavar="K", help="deeploy: the most shift groups "
                    "(RequantShift nodes) per requantization (default 2; 1: one shift each)")
    ex.add_argument("--no-preclip", action="store_true", help="deeploy: no pre-clip (fewer nodes, no Mul "
                    "constants; less precise on 8-bit networks: docs/export.md)")
    ex.add_argument("--input-bits", type=int, default=8, metavar="B", help="bits of the input grid (default 8)")
    ex.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet runs)")
    return parser


class UsageError(LabkitError, ValueError):
    """A command-line argument that cannot work (a missing file, an unwritable folder)."""


def _overrides(args) -> dict:
    overrides = dict(parse_override(text) for text in getattr(args, "overrides", []))
    if getattr(args, "data_root", None):
        overrides["data.root"] = args.data_root
    if getattr(args, "epochs", None) is not None:
        overrides["training.n_epochs"] = args.epochs
    if getattr(args, "pretrained", None):
        overrides["network.pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    return overrides


def _existing(path: str, what: str, fix: str) -> Path:
    found = resolve(path)
    if not found.exists():
        raise UsageError(f"{what} '{path}' not found: {fix}")
    return found


def _writable_folder(path: Path, what: str) -> Path:
    """``path`` as a folder that exists or can be made, and is writable (checked before any long work)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} '{path}' is a file: choose a folder (-o)")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what} '{path}' cannot be written ({probe} is not writable): choose another folder (-o)")
    return path


def cmd_convert(args) -> None:
    if args.source:
        _existing(args.source, "weights file", "pass a torchvision mobilenet_v2 state-dict file with --from")
    _writable_folder(Path(args.output).parent, "output folder")
    from labkit.train.pretrained import convert_file

    path, net = convert_file(args.output, args.source, capacity=args.capacity, config=args.stride_config)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"wrote {path}: MobileNetV2 capacity {net.capacity}, {net.num_classes} classes, {n_params:,} parameters")


def cmd_train(args) -> None:
    cfg = load_config(args.config, _overrides(args))  # torch-free: a bad config answers at once
    out = _writable_folder(Path(args.output_dir or Path("runs") / cfg["name"]), "run folder")
    from labkit.train.loop import train

    result = train(cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                   progress=not args.no_progress, verbose=args.verbose)
    print(f"final valid top-1 {result['valid']['top1']:.2f}%  (best {result['best_top1']:.2f}%)  -> {out}")


def _run_config(args, run: str) -> dict | None:
    """``--config`` (or the run's own config with ``--data-root``), validated; None: the run's own."""
    if getattr(args, "config", None):  # the run's network.pretrained is not needed (the checkpoint has the weights)
        return load_config(args.config, _overrides(args), check_files=False)
    if not args.data_root:
        return None
    from labkit.train.runs import load_run

    return resolve_config(load_run(run).config, _overrides(args), check_files=False)


def cmd_eval(args) -> None:
    _existing(args.checkpoint, "checkpoint", "pass a run folder or its last.ckpt / best.ckpt")
    from labkit.train.loop import evaluate_checkpoint
    from labkit.train.runs import RunFolder, describe_provenance

    m = evaluate_checkpoint(args.checkpoint, _run_config(args, args.checkpoint), device=args.device)
    print(f"{args.checkpoint}: valid loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  "
          f"({m['n']} images)")
    folder = resolve(args.checkpoint)
    folder = folder if folder.is_dir() else folder.parent
    for entry in RunFolder(folder).provenance():
        print(f"  {describe_provenance(entry)}")


def cmd_sweep(args) -> None:
    grid = {}
    if args.grid:
        grid = read_config_file(_existing(args.grid, "grid file", "pass a JSON grid, e.g. "
                                          '{"algorithm": ["pact", "tqt"], "bits": [8, 4], "seed": [0]}'))
    if args.algorithms:
        grid["algorithm"] = args.algorithms
    if args.bits:
        grid["bits"] = args.bits
    if args.budgets:
        for budget in args.budgets:
            parse_budget(budget)  # a bad budget answers before the sweep starts
        grid["budget"] = args.budgets
    grid.setdefault("seed", args.seeds)
    out = _writable_folder(Path(args.output_dir).absolute(), "sweep folder")
    from labkit.lab.sweep import run_sweep  # lazy: papermill and torch load only for a sweep that runs

    table = run_sweep(grid, out, epochs=args.epochs, data=args.data, data_root=args.data_root, device=args.device,
                      plan_bits=args.plan_bits, calib=args.calib)
    print(table)
    print(f"results: {out / 'results.csv'}, {out / 'results.png'}")


def cmd_plan(args) -> None:
    cfg = load_config(args.config, _overrides(args), check_files=False)  # torch-free: a bad config answers at once
    if not cfg["network"].get("quantize"):
        raise UsageError(f"config '{args.config}' has no network.quantize: pass the PACT/TQT config whose bits to "
                         "plan, e.g. configs/embedded/config.pact.4b.json")
    spec = parse_budget(args.budget)
    for what, bits in (("--bits", args.bits), ("--w-bits", args.w_bits), ("--a-bits", args.a_bits)):
        if bits:
            bit_choices(bits, what)  # a bad bit-width answers before torch loads
    if args.calib < 1:
        raise UsageError(f"--calib {args.calib}: give at least one calibration image")
    run = args.run or cfg["network"].get("pretrained")
    if not run:
        raise UsageError("no trained network to measure: pass --run (a run folder or checkpoint)")
    _existing(run, "run", "train it first (labkit train configs/embedded/config.fp32.json) or pass another --run")
    _writable_folder(Path(args.output).absolute().parent, "output folder")
    from labkit.precision.allocate import propose

    allocation = propose(cfg, spec, run, bits=args.bits, w_bits=args.w_bits, a_bits=args.a_bits, n_calib=args.calib,
                         progress=True)
    print(allocation.sensitivity.summary())
    print(allocation.table())
    path = allocation.save(args.output)
    print(f"wrote {path}: labkit train {path}")
    if args.plot:
        from labkit.lab.plots import plot_sensitivity

        plot_sensitivity(allocation.sensitivity).savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


def cmd_lab(args) -> None:
    out = _writable_folder(Path(args.output_dir).absolute(), "lab folder")
    from labkit.lab.notebooks import lab_results, run_notebooks

    executed = run_notebooks(out, verbose=args.verbose)
    print(lab_results(executed))
    print("open the executed notebooks in JupyterLab for the plots and per-layer tables")


def _integer_run(args):
    _existing(args.run, "run", "pass a run folder of labkit train (e.g. runs/embedded-pact) or a checkpoint")
    from labkit.lab.twins import integerize_run
    from labkit.train.data import build_datasets

    twin = integerize_run(args.run, input_bits=args.input_bits, d=args.d, config=_run_config(args, args.run))
    train, val = build_datasets(twin.run.config["data"])
    return twin.run, twin.inet, train, val


def cmd_integerize(args) -> None:
    if args.output_dir:
        _writable_folder(Path(args.output_dir), "output folder")
    from torch.utils.data import DataLoader, Subset

    from labkit.integer import compare
    from labkit.integer.size import size_report

    loaded, inet, _, val = _integer_run(args)
    if args.limit:
        val = Subset(val, range(min(args.limit, len(val))))
    result = compare(loaded.net, inet, DataLoader(val, batch_size=64))
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
    run = resolve(args.run)
    out = _writable_folder(Path(args.output_dir) if args.output_dir else (run if run.is_dir() else run.parent) /
                           ("export" if args.target == "onnx" else f"export-{args.target}"), "export folder")
    if (args.max_groups is not None or args.no_preclip) and args.target != "deeploy":
        raise UsageError("--max-groups and --no-preclip set the int32 twin of --target deeploy only")
    if args.calibrate is not None and (args.target != "deeploy" or args.calibrate < 1):
        raise UsageError("--calibrate N (N >= 1 training images) sets the int32 shifts of --target deeploy only")
    import torch
    from torch.utils.data import DataLoader, Subset

    from labkit.export import check_export, export
    from labkit.integer import compare, int32_twin

    _, inet, train, val = _integer_run(args)
    n = max(1, min(args.n_inputs, len(val)))
    inputs = torch.stack([val[i][0] for i in range(n)])
    if args.target == "deeploy":
        calibration = args.calibrate and DataLoader(Subset(train, range(min(args.calibrate, len(train)))),
                                                    batch_size=64)
        forms = {"preclip": False} if args.no_preclip else {}
        if args.max_groups is not None:
            forms["max_groups"] = args.max_groups
        exact, (inet, plan) = inet, int32_twin(inet, calibration or None, args.margin, **forms)
        plan.add_agreement(compare(exact, inet, inputs), f"the {n} exported images")
    paths = export(inet, out, inputs, target=args.target, activations=args.activations, batch=args.batch)
    if args.target == "deeploy":
        paths["int32"] = out / "int32.csv"
        plan.table().to_csv(paths["int32"])
        print(plan.summary())
    for path in paths.values():
        print(f"wrote {path}")
    check = check_export(out)
    how = " (RequantShift in Deeploy's semantics)" if args.target == "deeploy" else ""
    print(f"onnxruntime{how} on {check['samples']} inputs: "
          f"{'identical to outputs.npz' if check['exact'] else 'DIFFERS'} (max |difference| {check['max_abs_diff']}); "
          f"{check['onnx_nodes']} nodes: {', '.join(check['ops'])}")
    if not check["exact"]:
        raise SystemExit(1)


COMMANDS = {"convert": cmd_convert, "train": cmd_train, "eval": cmd_eval, "plan": cmd_plan, "sweep": cmd_sweep,
            "lab": cmd_lab, "integerize": cmd_integerize, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except LabkitError as err:
        if args.debug:
            raise
        print(f"labkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"labkit {args.command}: interrupted (what finished is kept; labkit train --resume continues a run)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
