"""``labkit`` command line: convert, train, evaluate, plan, sweep, the lab, integerize, export.

Logic lives in the library; this module parses arguments and checks every one of them (paths, ranges, what
would be ignored) and the config before the heavy imports (torch takes seconds to import on a busy machine, a
typo should not), and prints every :class:`labkit.config.errors.LabkitError` as one line with exit status 2
(``--debug`` shows the traceback). Imports of heavy modules sit inside the command functions for that reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from labkit.config.arguments import ArgumentError, existing, integer, number, writable_file, writable_folder
from labkit.config.budget import SENSITIVITY_METHOD, SENSITIVITY_METHODS, bit_choices, parse_budget
from labkit.config.errors import LabkitError
from labkit.config.loading import load_config, parse_override, read_config_file, resolve_config
from labkit.config.paths import resolve
from labkit.config.spec import D_MAX, MAX_BITS, MIN_BITS

EPILOG = """examples:
  labkit train configs/embedded/config.fp32.json            # FP32 on the embedded digits (~2 min on a CPU)
  labkit train configs/embedded/config.pact.json            # PACT QAT from runs/embedded-fp32/best.ckpt
  labkit train configs/imagenet/config.fp32.json --data-root /data/ILSVRC12
  torchrun --nproc_per_node 4 -m labkit.cli train configs/imagenet/config.pact.json --data-root /data/ILSVRC12
  labkit convert --output pretrained/mnv2_1.0.ckpt     # from the torch hub cache, or --from FILE
  labkit eval runs/embedded-fp32/best.ckpt
  labkit plan configs/embedded/config.pact.4b.json -b weight_bytes=uniform:3,act_bytes=uniform:3 -o plan.json
  labkit integerize runs/embedded-pact                 # integer twin: per-layer code agreement, size report
  labkit export runs/embedded-tqt -o runs/export-tqt   # network.onnx, inputs/outputs.npz, onnxruntime check
  labkit export runs/embedded-pact --target deeploy    # RequantShift (int32) for Deeploy's Generic platform
  labkit export runs/embedded-pact --target deeploy-cmsis --n-inputs 16   # for Deeploy's CMSIS (Cortex-M)
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``labkit train: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="labkit", description="Quantization-aware training (PACT/SAWB, TQT) of MobileNetV2.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in (_convert_parser, _train_parser, _eval_parser, _plan_parser, _sweep_parser, _lab_parser,
                _integerize_parser, _export_parser):
        add(sub)
    return parser


def _convert_parser(sub) -> None:
    conv = sub.add_parser(
        "convert", help="torchvision mobilenet_v2 weights -> labkit checkpoint",
        description="Write a labkit MobileNetV2 checkpoint from torchvision weights: a state-dict file "
                    "(--from) or, without --from, torchvision's IMAGENET1K_V1 file in the local torch hub "
                    "cache ($TORCH_HOME/hub/checkpoints). Nothing is downloaded.")
    conv.add_argument("--from", dest="source", metavar="FILE", help="torchvision mobilenet_v2 state-dict "
                      "file (e.g. mobilenet_v2-b0353104.pth); default: the torch hub cache")
    conv.add_argument("--output", "-o", required=True, metavar="FILE",
                      help="checkpoint to write (atomically)")
    conv.add_argument("--capacity", type=float, metavar="W", help="width multiplier; default: read from "
                                                                  "shapes")
    conv.add_argument("--stride-config", default="standard", metavar="NAME",
                      help="stride table of the labkit model: standard (ImageNet) or small (32 px inputs)")


def _train_parser(sub) -> None:
    tr = sub.add_parser(
        "train", help="train a network from a JSON config (FP32, PACT or TQT)",
        description="Train from a QuantLab-shaped JSON config. The run folder gets config.json, "
                    "history.jsonl (one record per epoch), last.ckpt and best.ckpt. Under torchrun it trains "
                    "with DistributedDataParallel; on a GPU with AMP and channels_last.")
    tr.add_argument("config", help="JSON config, e.g. configs/embedded/config.fp32.json")
    tr.add_argument("--output-dir", "-o", metavar="DIR", help="run folder; default: runs/<folder>-<config "
                    "name>, e.g. runs/embedded-fp32")
    tr.add_argument("--epochs", type=int, metavar="N", help="override training.n_epochs")
    tr.add_argument("--resume", action="store_true", help="continue the run in DIR from its last.ckpt (same "
                    "config; a larger --epochs extends it where the schedule allows)")
    tr.add_argument("--overwrite", action="store_true", help="replace the run that DIR holds (its config, "
                    "history and checkpoints are deleted first)")
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    tr.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet folder with train/ and "
                                                       "val/)")
    tr.add_argument("--pretrained", metavar="FILE", help="override network.pretrained (full-precision "
                    "checkpoint); 'none' to start from scratch")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key by its dotted path, value as JSON, e.g. "
                         "--set data.train.dataloader.bs=128 (repeatable)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch only)")
    tr.add_argument("--no-tensorboard", action="store_true",
                    help="write no TensorBoard events (history.jsonl keeps every record)")
    tr.add_argument("--verbose", action="store_true", help="also print every quantizer's bounds at each "
                    "controller command (always written to the run folder's quantizers.jsonl)")


def _eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="validation loss/top-1/top-5 of a checkpoint",
        description="Evaluate a run checkpoint on its validation set, with the config stored in it "
                    "(or --config).")
    ev.add_argument("checkpoint", help="checkpoint written by labkit train (last.ckpt / best.ckpt)")
    ev.add_argument("--config", metavar="FILE", help="config to use instead of the one stored in the "
                                                     "checkpoint")
    ev.add_argument("--data-root", metavar="DIR", help="override data.root")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _plan_parser(sub) -> None:
    pl = sub.add_parser(
        "plan", help="propose per-layer bits for a budget (sensitivity + exact allocation) -> a config",
        description="Measure each layer's sensitivity (calibration-loss increase with only that layer "
                    "quantized, per bit-width; cached as sensitivity.json beside the checkpoint), choose the "
                    "bits that minimise their sum under the budget (exact integer program), and write the "
                    "base config with those bits.")
    pl.add_argument("config", help="PACT/TQT base config, e.g. configs/embedded/config.pact.4b.json (SAWB "
                                   "weights)")
    pl.add_argument("--budget", "-b", action="append", required=True, metavar="METRIC=LIMIT",
                    help="weight_bytes, act_bytes or BOPs at most LIMIT: a number or uniform:B (what every "
                         "layer at B bits costs), e.g. weight_bytes=uniform:3,act_bytes=uniform:3 "
                         "(repeatable)")
    pl.add_argument("--run", metavar="RUN", help="trained run (folder or .ckpt) whose float weights are "
                    "measured; default: the config's network.pretrained")
    pl.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8], metavar="B",
                    help="bit-widths to measure and choose from (default 2 3 4 8)")
    pl.add_argument("--w-bits", nargs="+", type=int, metavar="B",
                    help="weight bits to choose from (default --bits)")
    pl.add_argument("--a-bits", nargs="+", type=int, metavar="B",
                    help="activation bits to choose (default --bits)")
    pl.add_argument("--calib", type=int, default=256, metavar="N",
                    help="training images to measure on (default 256)")
    pl.add_argument("--sensitivity", default=SENSITIVITY_METHOD, metavar="METHOD",
                    help="loss: calibration-loss increase with one layer quantized at a time (default); "
                         "fisher: empirical Fisher x squared quantization error (second order, as HAWQ-V2)")
    pl.add_argument("--no-probe", action="store_true",
                    help="write the plan of least summed sensitivity; by default the plans of several "
                         "weight scales are each trained 2 epochs and the least training loss wins "
                         "(labkit.lab.probe)")
    pl.add_argument("--output", "-o", required=True, metavar="FILE",
                    help="config to write, e.g. runs/plan/plan.json")
    pl.add_argument("--plot", metavar="FILE.png", help="also draw the sensitivity heat map there")
    pl.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet)")


def _sweep_parser(sub) -> None:
    """``labkit sweep``: the grid, where its jobs run, ``--status``."""
    sw = sub.add_parser(
        "sweep", help="a grid of QAT runs (algorithm x bits or budget x seed), one job per point, here or on "
                      "Slurm",
        description="Check every grid point, then run each as one job (submitit) into its own run folder: "
                    "the training notebook through papermill (kept as <point>.ipynb), or what labkit train "
                    "runs (--runner train). --launcher local runs the jobs here and waits; --launcher slurm "
                    "submits them with sbatch. sweep.json records the job ids; --status DIR shows every "
                    "point's state. Running the same command again skips finished points and resumes the "
                    "others. When the jobs have ended, results.csv (with each plan's weight/activation bytes "
                    "and BOPs) and results.png are written; a point that failed makes the command exit 1, "
                    "naming it.")
    sw.add_argument("grid", nargs="?", metavar="GRID.json",
                    help='grid file, e.g. {"algorithm": ["pact", "tqt"], "bits": [8, 4], "seed": [0]}, '
                         'optionally with a "slurm" section ({"partition": "gpu", "gpus": 1, '
                         '"time": "12:00:00"})')
    sw.add_argument("--status", metavar="DIR", help="show the state of every point of the sweep in DIR; exit")
    sw.add_argument("--algorithms", nargs="+", metavar="ALG",
                    help="pact, tqt, ... (configs/<data>/config.<ALG>.json)")
    sw.add_argument("--bits", nargs="+", type=int, metavar="B",
                    help="weight and activation bits of every layer")
    sw.add_argument("--budgets", nargs="+", metavar="BUDGET", help="train the proposed plan of each budget "
                    "(as for labkit plan), e.g. weight_bytes=uniform:3,act_bytes=uniform:3")
    _budget_plan_options(sw.add_argument_group("budget plans (as for labkit plan)"))
    sw.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S",
                    help="training seeds (default 0)")
    sw.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    sw.add_argument("--data", default="embedded", help="config folder: embedded (default) or imagenet")
    sw.add_argument("--configs", metavar="DIR",
                    help="folder of the config.<ALG>.json files (default configs/<data>)")
    sw.add_argument("--data-root", metavar="DIR", help="ImageNet folder (with --data imagenet)")
    sw.add_argument("--pretrained", metavar="FILE", help="FP32 checkpoint every point starts from (default: "
                    "each config's network.pretrained)")
    sw.add_argument("--output-dir", "-o", default="runs/sweep", metavar="DIR", help="default: runs/sweep")
    sw.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sw.add_argument("--runner", choices=("notebook", "train"), default="notebook",
                    help="notebook: the training notebook through papermill (default); train: what labkit "
                         "train runs (needed for --gpus above 1: one process per GPU)")
    sw.add_argument("--launcher", choices=("local", "slurm"), default="local",
                    help="local: jobs as processes on this machine (default); slurm: sbatch jobs")
    sw.add_argument("--parallel", type=int, metavar="N", help="local: jobs at once (default 1)")
    sl = sw.add_argument_group("slurm (--launcher slurm; also the grid file's \"slurm\" section)")
    sl.add_argument("--partition", metavar="NAME", help="Slurm partition")
    sl.add_argument("--gpus", type=int, metavar="N", help="GPUs per job (default 1; 0 for CPU jobs)")
    sl.add_argument("--time", metavar="LIMIT", help="time limit per job: minutes, H:MM:SS or D-HH:MM:SS "
                    "(default 24:00:00)")
    sl.add_argument("--cpus", type=int, metavar="N", help="CPUs per task (data loading workers + 1)")
    sl.add_argument("--mem-gb", type=float, metavar="GB", help="memory per node")
    sl.add_argument("--sbatch", action="append", metavar="KEY=VALUE", help="any other sbatch option, e.g. "
                    "--sbatch account=lab --sbatch qos=high (repeatable)")
    sl.add_argument("--setup", action="append", metavar="LINE", help="shell line run before each job, e.g. "
                    "'source ~/venv/bin/activate' (repeatable)")
    sl.add_argument("--wait", action="store_true", help="wait for the jobs to end, then write results.csv")
    sl.add_argument("--dry-run", action="store_true", help="write each job's sbatch script to "
                    "DIR/jobs/<point>.sbatch instead of submitting it")


def _budget_plan_options(group) -> None:
    group.add_argument("--plan-bits", nargs="+", type=int, metavar="B",
                       help="bits the budget plans choose from (default 2 3 4 8)")
    group.add_argument("--calib", type=int, metavar="N",
                       help="calibration images of the budget plans (default 256)")
    group.add_argument("--sensitivity", metavar="METHOD",
                       help="sensitivity of the budget plans: loss (default) or fisher")
    group.add_argument("--no-probe", action="store_true",
                       help="budget plans without the 2-epoch probe of candidates")


def _lab_parser(sub) -> None:
    lab = sub.add_parser(
        "lab", help="the whole flow on the embedded default: FP32 -> PACT -> TQT -> integerize/export",
        description="Execute the lab notebooks in order with papermill (their default parameters: the "
                    "embedded default), printing one line per training epoch, then a results table: "
                    "FP32/PACT/TQT top-1, the integer networks' agreement, and where each run and export is.")
    lab.add_argument("--output-dir", "-o", default="runs/lab", metavar="DIR",
                     help="where the executed notebooks go (default runs/lab); runs go to runs/embedded-*")
    lab.add_argument("--verbose", action="store_true", help="print every line the notebooks print")


def _integerize_parser(sub) -> None:
    ig = sub.add_parser(
        "integerize", help="integer network of a PACT/TQT run; per-layer check against fake quantization",
        description="Turn a trained PACT/TQT run into its integer twin (integer weight codes, BN folded into "
                    "per-channel requantizations y = clip(floor((acc*mul + add) / 2^d)), integer adds and "
                    "pool), run both on the validation set and print, per layer, the share of identical "
                    "codes and the largest code difference, the prediction agreement and both top-1s; then "
                    "the size report.")
    ig.add_argument("run", help="run folder (uses best.ckpt, or last.ckpt when best.ckpt predates "
                    "quantization) or checkpoint file, e.g. runs/embedded-pact")
    ig.add_argument("--d", type=int, metavar="D", help="one requantization shift for every layer (e.g. 24); "
                    "default: the most exact per layer (worst case below 2^53)")
    ig.add_argument("--input-bits", type=int, default=8, metavar="B",
                    help="bits of the input grid (default 8)")
    ig.add_argument("--limit", type=int, metavar="N", help="compare on the first N validation images only")
    ig.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet runs)")
    ig.add_argument("--output-dir", "-o", metavar="DIR", help="also write comparison.csv and size.csv there")


def _export_parser(sub) -> None:
    ex = sub.add_parser(
        "export", help="integer network as network.onnx + inputs.npz/outputs.npz (golden data), for "
                       "onnxruntime, qonnx or Deeploy",
        description="Integerize a PACT/TQT run and write network.onnx for a target, inputs.npz (input codes) "
                    "and outputs.npz (int64 logits) for the first validation images, and with --activations "
                    "every layer's integer output; then check the export with onnxruntime. Targets: onnx "
                    "(standard operators, requantization as Mul-Add-Div-Floor-Clip, symbolic batch), qonnx "
                    "(the same with the batch fixed to --n-inputs and a shape on every tensor, for qonnx's "
                    "execute_onnx), deeploy (the int32 twin: one RequantShift node per requantization, as "
                    "Deeploy's Generic platform reads it; writes int32.csv, the per-layer shifts, bound, "
                    "headroom, proven error and the share of codes identical to the exact twin on the "
                    "exported images), deeploy-cmsis (the CMSIS twin: each conv/linear/pool requantization "
                    "with its bias before the multiply, as Deeploy's CMSIS platform merges and computes it, "
                    "in the graph that platform maps; writes int32.csv likewise). docs/export.md says which "
                    "tools and versions were run on each.")
    ex.add_argument("run", help="run folder or checkpoint file, e.g. runs/embedded-tqt")
    ex.add_argument("--target", choices=("onnx", "qonnx", "deeploy", "deeploy-cmsis"), default="onnx",
                    help="onnx (default), qonnx, deeploy or deeploy-cmsis")
    ex.add_argument("--output-dir", "-o", metavar="DIR", help="export folder; default: "
                                                              "<run>/export[-<target>]")
    ex.add_argument("--n-inputs", type=int, default=8, metavar="N",
                    help="validation images in the golden data "
                    "(default 8; the static batch of the qonnx and deeploy targets)")
    ex.add_argument(
        "--batch",
        type=int,
        metavar="B",
        help=(
            "qonnx and deeploy: the network's static batch "
            "(default --n-inputs; it must divide --n-inputs: the golden data then holds several runs)"
        ),
    )
    ex.add_argument("--activations", action="store_true", help="also write activations.npz (every layer)")
    ex.add_argument("--d", type=int, metavar="D", help="one requantization shift for every layer of the "
                    "exact twin; default: the most exact per layer")
    ex.add_argument("--calibrate", type=int, metavar="N", help="deeploy: int32 shifts from the largest "
                    "values on the first N training images times --margin (larger shifts, not proven); "
                    "default: bounds proven for every input")
    ex.add_argument("--margin", type=float, metavar="M", help="deeploy with --calibrate: factor on "
                    "the largest values seen (default 2)")
    ex.add_argument("--max-groups", type=int, default=None, metavar="K",
                    help="deeploy: the most shift groups (RequantShift nodes) per requantization (default 3; "
                    "1: one shift each)")
    ex.add_argument("--no-preclip", action="store_true", help="deeploy: no pre-clip (fewer nodes, no Mul "
                    "constants; less precise on 8-bit networks: docs/export.md)")
    ex.add_argument("--input-bits", type=int, default=8, metavar="B",
                    help="bits of the input grid (default 8)")
    ex.add_argument("--data-root", metavar="DIR", help="override data.root (ImageNet runs)")


def _overrides(args) -> dict:
    """The command line's config overrides (whether their files exist is the config's check)."""
    overrides = dict(parse_override(text) for text in getattr(args, "overrides", []))
    if getattr(args, "data_root", None) is not None:
        overrides["data.root"] = args.data_root
    if getattr(args, "epochs", None) is not None:
        overrides["training.n_epochs"] = args.epochs
    if getattr(args, "pretrained", None) is not None:
        overrides["network.pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    return overrides


def _run_path(args) -> Path:
    return existing(args.run, "run", "pass a run folder of labkit train (e.g. runs/embedded-pact) or a "
                                     "checkpoint")


def _run_config(args, run: str) -> dict | None:
    """``--config`` (or the run's own config with ``--data-root``), validated; None: the run's own."""
    # the run's network.pretrained is not needed (the checkpoint has the weights)
    if getattr(args, "config", None):
        return load_config(args.config, _overrides(args), check_files=False)
    if not args.data_root:
        return None
    from labkit.train.runs import load_run

    return resolve_config(load_run(run).config, _overrides(args), check_files=False)


def _integer_args(args) -> None:
    """The integer twin's arguments (integerize, export): the input grid's bits and the optional fixed
    shift."""
    integer(args.input_bits, "--input-bits", MIN_BITS, MAX_BITS, "bits of the input grid, 8 by default")
    if args.d is not None:
        integer(args.d, "--d", 1, D_MAX, "one requantization shift for every layer; leave it out for the "
                                        "most exact shift per layer")


def cmd_convert(args) -> None:
    if args.source:
        existing(args.source, "weights file", "pass a torchvision mobilenet_v2 state-dict file with --from",
                 "file")
    if args.capacity is not None:
        number(args.capacity, "--capacity", 0.01, "the width multiplier, e.g. 0.35 or 1.0")
    out = writable_file(args.output, "output file", "-o FILE.ckpt")
    from labkit.train.pretrained import convert_file

    path, net = convert_file(out, args.source, capacity=args.capacity, config=args.stride_config)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"wrote {path}: MobileNetV2 capacity {net.capacity}, {net.num_classes} classes, {n_params:,} "
          "parameters")


def cmd_train(args) -> None:
    if args.resume and args.overwrite:
        raise ArgumentError("--resume and --overwrite exclude each other: continue the run, or replace it")
    cfg = load_config(args.config, _overrides(args))  # torch-free: a bad config answers at once
    out = writable_folder(Path("runs") / cfg["name"] if args.output_dir is None else args.output_dir,
                          "run folder")
    from labkit.train.loop import train

    result = train(cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                   progress=not args.no_progress, verbose=args.verbose, tensorboard=not args.no_tensorboard)
    print(f"final valid top-1 {result['valid']['top1']:.2f}%  (best {result['best_top1']:.2f}%)  -> {out}")


def cmd_eval(args) -> None:
    existing(args.checkpoint, "checkpoint", "pass a run folder or its last.ckpt / best.ckpt")
    cfg = _run_config(args, args.checkpoint)
    from labkit.train.evaluate import evaluate_checkpoint
    from labkit.train.runs import RunFolder, describe_provenance

    m = evaluate_checkpoint(args.checkpoint, cfg, device=args.device)
    print(f"{args.checkpoint}: valid loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  "
          f"({m['n']} images)")
    folder = resolve(args.checkpoint)
    folder = folder if folder.is_dir() else folder.parent
    for entry in RunFolder(folder).provenance():
        print(f"  {describe_provenance(entry)}")


SLURM_FLAGS = ("partition", "gpus", "time", "cpus", "mem_gb", "sbatch", "setup")


def cmd_sweep(args) -> None:
    if args.status:
        existing(args.status, "sweep folder", "pass the folder a sweep wrote (labkit sweep ... -o DIR)",
                 "folder")
        from labkit.lab.sweep import sweep_status  # lazy: papermill and torch load only for a sweep

        print(sweep_status(args.status))
        return
    grid, slurm, options = _sweep_request(args)
    out = writable_folder(args.output_dir, "sweep folder")
    from labkit.lab.sweep import run_sweep  # lazy: papermill and torch load only for a sweep that runs

    table = run_sweep(grid, out, data=args.data, configs=args.configs, data_root=args.data_root,
                      device=args.device, pretrained=args.pretrained, slurm=slurm, wait=args.wait,
                      dry_run=args.dry_run, **options)
    print(table)
    if "status" not in table.columns:  # submitted (or written) only
        return
    print(f"results: {out / 'results.csv'}, {out / 'results.png'}")
    bad = [r for r in table.rows if r.get("status") != "ok"]
    if bad:
        print(f"labkit sweep: {len(bad)} of {len(table.rows)} points did not finish: "
              + "; ".join(f"{r['run']} {r['status']} ({r.get('error') or 'no error recorded'})" for r in bad)
              + ". Rerun the same command to run them again (run folders resume), or see labkit sweep "
              f"--status {out}", file=sys.stderr)
        raise SystemExit(1)


def _sweep_request(args) -> tuple[dict, dict, dict]:
    """``(grid, Slurm options, settings)`` of ``labkit sweep``, checked without torch."""
    grid = {}
    if args.grid:
        grid = read_config_file(existing(args.grid, "grid file", "pass a JSON grid, e.g. "
                                         '{"algorithm": ["pact", "tqt"], "bits": [8, 4], "seed": [0]}',
                                         "file"))
    given = (("algorithm", args.algorithms), ("bits", args.bits), ("budget", args.budgets))
    grid.update({k: v for k, v in given if v})
    for budget in grid.get("budget") or []:
        parse_budget(budget)  # a bad budget answers before the sweep starts
    grid.setdefault("seed", args.seeds)
    for flag, value in (("--plan-bits", args.plan_bits), ("--calib", args.calib),
                        ("--sensitivity", args.sensitivity), ("--no-probe", args.no_probe or None)):
        if value is not None and not grid.get("budget"):
            raise ArgumentError(f"{flag} sets how budget points are planned, and this grid has none: give "
                             "--budgets (or leave it out)")
    slurm = {k: getattr(args, k) for k in SLURM_FLAGS if getattr(args, k) is not None}  # 0 is a value
    if args.launcher != "slurm" and (slurm or args.wait or args.dry_run):
        flag = next(iter(slurm), "wait" if args.wait else "dry-run").replace("_", "-")
        raise ArgumentError(f"--{flag} applies to --launcher slurm only")
    if args.launcher == "slurm" and args.parallel is not None:
        raise ArgumentError("--parallel applies to --launcher local only (Slurm runs what its queue allows)")
    if args.pretrained:
        existing(args.pretrained, "pretrained checkpoint", "pass the FP32 checkpoint the points start from",
                 "file")
    from labkit.lab import sweep_grid  # torch-free: the grid and settings answer before the heavy imports

    options = {"epochs": args.epochs, "calib": 256 if args.calib is None else args.calib,
               "sensitivity": args.sensitivity or SENSITIVITY_METHOD, "probe": not args.no_probe,
               "launcher": args.launcher, "plan_bits": args.plan_bits or (2, 3, 4, 8),
               "parallel": 1 if args.parallel is None else args.parallel, "runner": args.runner}
    for point in sweep_grid.expand_grid({k: v for k, v in grid.items() if k != "slurm"}):
        sweep_grid.algorithm_config(point["algorithm"], args.data, args.configs)
    section = sweep_grid.slurm_options(args.launcher, grid.get("slurm"), slurm, args.dry_run)
    sweep_grid.check_settings(**options, slurm=section)
    return grid, slurm, options


def cmd_plan(args) -> None:
    # torch-free: a bad config answers at once
    cfg = load_config(args.config, _overrides(args), check_files=False)
    if not cfg["network"].get("quantize"):
        raise ArgumentError(f"config '{args.config}' has no network.quantize: pass the PACT/TQT config whose "
                            "bits to plan, e.g. configs/embedded/config.pact.4b.json")
    spec = parse_budget(args.budget)
    for what, bits in (("--bits", args.bits), ("--w-bits", args.w_bits), ("--a-bits", args.a_bits)):
        if bits:
            bit_choices(bits, what)  # a bad bit-width answers before torch loads
    integer(args.calib, "--calib", 1, fix="training images to measure on")
    if args.sensitivity not in SENSITIVITY_METHODS:
        methods = " or ".join(SENSITIVITY_METHODS)
        raise ArgumentError(f"--sensitivity {args.sensitivity}: use {methods} (loss: one layer quantized at "
                            "a time; fisher: second order)")
    run = args.run or cfg["network"].get("pretrained")
    if not run:
        raise ArgumentError("no trained network to measure: pass --run (a run folder or checkpoint)")
    existing(run, "run", "train it first (labkit train configs/embedded/config.fp32.json) or pass another "
                         "--run")
    output = writable_file(args.output, "output config", "-o FILE.json")
    plot = args.plot and writable_file(args.plot, "plot", "--plot FILE.png")
    from labkit.precision.allocate import propose
    from labkit.lab.probe import probe_table, propose_probed

    choose = {"bits": args.bits, "w_bits": args.w_bits, "a_bits": args.a_bits, "n_calib": args.calib,
              "method": args.sensitivity, "progress": True}
    if args.no_probe:
        allocation = propose(cfg, spec, run, **choose)
    else:
        allocation, probed = propose_probed(cfg, spec, run, **choose)
        if probed:
            print(probe_table(probed))
    print(allocation.sensitivity.summary())
    print(allocation.table())
    path = allocation.save(output)
    print(f"wrote {path}: labkit train {path}")
    if plot:
        from labkit.lab.plots import plot_sensitivity

        plot_sensitivity(allocation.sensitivity).savefig(plot, dpi=100)
        print(f"wrote {plot}")


def cmd_lab(args) -> None:
    out = writable_folder(args.output_dir, "lab folder")
    from labkit.lab.notebooks import lab_results, run_notebooks

    executed = run_notebooks(out, verbose=args.verbose)
    print(lab_results(executed))
    print("open the executed notebooks in JupyterLab for the plots and per-layer tables")


def _twin(args):
    from labkit.lab.twins import integerize_run

    return integerize_run(args.run, input_bits=args.input_bits, d=args.d, config=_run_config(args, args.run))


def cmd_integerize(args) -> None:
    _run_path(args)
    _integer_args(args)
    if args.limit is not None:
        integer(args.limit, "--limit", 1, fix="the number of validation images to compare on; leave it out "
                                              "for all")
    out = args.output_dir and writable_folder(args.output_dir, "output folder")
    from torch.utils.data import DataLoader, Subset

    from labkit.integer import compare
    from labkit.integer.size import size_report
    from labkit.train.data import build_datasets

    twin = _twin(args)
    _, val = build_datasets(twin.run.config["data"])
    if args.limit:
        val = Subset(val, range(min(args.limit, len(val))))
    result = compare(twin.run.net, twin.inet, DataLoader(val, batch_size=64))
    sizes = size_report(twin.inet)
    print(f"{result.table()}\n\n{sizes}\n\n{result.summary()}")
    print(f"target (>= 99.99% identical codes in every layer, identical predictions and top-1): "
          f"{'met' if result.ok() else 'NOT met'}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        result.table().to_csv(out / "comparison.csv")
        sizes.to_csv(out / "size.csv")
        print(f"wrote {out / 'comparison.csv'} and {out / 'size.csv'}")


def _export_args(args) -> Path:
    run = _run_path(args)
    _integer_args(args)
    integer(args.n_inputs, "--n-inputs", 1, fix="validation images in the golden data")
    if args.calibrate is not None:
        if args.target == "deeploy-cmsis":
            raise ArgumentError("--calibrate sets the int32 shifts of --target deeploy only: deeploy-cmsis "
                                "multiplies in 64 bits, its bounds are proven for every input")
        if args.target != "deeploy":
            raise ArgumentError("--calibrate sets the int32 shifts of --target deeploy only, not of "
                                f"{args.target}")
        integer(args.calibrate, "--calibrate", 1, fix="training images whose largest values bound the int32 "
                                                      "shifts")
        args.margin = number(2.0 if args.margin is None else args.margin, "--margin", 1.0,
                             "the factor on the largest values seen; below 1 the int32 sums can overflow")
    elif args.margin is not None:
        raise ArgumentError("--margin is the factor of --calibrate: without --calibrate N the int32 bounds "
                            "are proven for every input and take no margin")
    if (args.max_groups is not None or args.no_preclip) and args.target != "deeploy":
        raise ArgumentError("--max-groups and --no-preclip set the int32 twin of --target deeploy only")
    if args.max_groups is not None:
        integer(args.max_groups, "--max-groups", 1, fix="shift groups per requantization, 3 by default")
    if args.batch is not None:
        integer(args.batch, "--batch", 1, fix="the static batch of the exported graph")
        if args.n_inputs % args.batch:
            raise ArgumentError(f"--batch {args.batch} does not divide --n-inputs {args.n_inputs}: the "
                                "golden data holds whole runs of the static batch")
    default = (run if run.is_dir() else run.parent) / (
        "export" if args.target == "onnx" else f"export-{args.target}"
    )
    return writable_folder(default if args.output_dir is None else args.output_dir, "export folder")


def cmd_export(args) -> None:
    out = _export_args(args)
    import torch
    from torch.utils.data import DataLoader, Subset

    from labkit.export import check_export, export
    from labkit.integer import cmsis_twin, compare, int32_twin
    from labkit.train.data import build_datasets

    twin = _twin(args)
    inet = twin.inet
    train, val = build_datasets(twin.run.config["data"])
    if args.n_inputs > len(val):
        raise ArgumentError(f"--n-inputs {args.n_inputs}: the validation set has {len(val)} images")
    inputs = torch.stack([val[i][0] for i in range(args.n_inputs)])
    if args.target == "deeploy-cmsis":
        exact, (inet, plan) = inet, cmsis_twin(inet)
        plan.add_agreement(compare(exact, inet, inputs), f"the {args.n_inputs} exported images")
    if args.target == "deeploy":
        calibration = args.calibrate and DataLoader(Subset(train, range(min(args.calibrate, len(train)))),
                                                    batch_size=64)
        forms = {"preclip": False} if args.no_preclip else {}
        if args.max_groups is not None:
            forms["max_groups"] = args.max_groups
        exact, (inet, plan) = inet, int32_twin(inet, calibration or None, args.margin or 2.0, **forms)
        plan.add_agreement(compare(exact, inet, inputs), f"the {args.n_inputs} exported images")
    paths = export(inet, out, inputs, target=args.target, activations=args.activations, batch=args.batch)
    if args.target.startswith("deeploy"):
        paths["int32"] = out / "int32.csv"
        plan.table().to_csv(paths["int32"])
        print(plan.summary())
    for path in paths.values():
        print(f"wrote {path}")
    check = check_export(out)
    how = " (RequantShift in Deeploy's semantics)" if args.target.startswith("deeploy") else ""
    print(f"onnxruntime{how} on {check['samples']} inputs: "
          f"{'identical to outputs.npz' if check['exact'] else 'DIFFERS'} (max |difference| "
          f"{check['max_abs_diff']}); {check['onnx_nodes']} nodes: {', '.join(check['ops'])}")
    if not check["exact"]:
        raise SystemExit(1)


COMMANDS = {"convert": cmd_convert, "train": cmd_train, "eval": cmd_eval, "plan": cmd_plan,
            "sweep": cmd_sweep,
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
        print(f"labkit {args.command}: interrupted (what finished is kept; labkit train --resume continues a "
              "run)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
