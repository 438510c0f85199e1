"""Notebook-level steps of the lab: resolve a run's config from notebook parameters, make sure the FP32
checkpoint a QAT run starts from exists, and run executed notebooks in sequence (the main job)."""

from __future__ import annotations

from pathlib import Path

from labkit.config import load_config
from labkit.paths import resolve

NOTEBOOK_DIR = "notebooks"
MAIN_FLOW = ("02_fp32_check", "03_pact_training", "04_tqt_training", "05_integerize_export")


def run_config(config: str, *, data_root: str | None = None, epochs: int | None = None,
               pretrained: str | None = None, w_bits: int | None = None, a_bits: int | None = None,
               seed: int | None = None, overrides: dict | None = None) -> dict:
    """A notebook's parameters -> resolved config. ``pretrained`` None keeps the config's own.
    ``w_bits``/``a_bits`` re-plan every quantized layer (first and last layer included) at those bits,
    keeping the config's algorithm (PACT or TQT)."""
    extra = dict(overrides or {})
    for key, value in (("data.root", data_root), ("training.n_epochs", epochs), ("training.seed", seed)):
        if value is not None:
            extra[key] = value
    if pretrained is not None:
        extra["network.pretrained"] = str(resolve(pretrained))
    cfg = load_config(config, extra, check_files=False)  # ensure_pretrained() makes or reports the checkpoint
    if (w_bits or a_bits) and cfg["network"].get("quantize"):
        from labkit.bitwidths import BitPlan
        from labkit.data import input_size
        from labkit.models import MobileNetV2

        plan = BitPlan(MobileNetV2(**cfg["network"]["kwargs"]), input_size(cfg["data"]))
        plan.set_all(w_bits or 8, a_bits or 8)
        cfg = plan.to_config(cfg)
    return cfg


def ensure_pretrained(cfg: dict, fp32_config: str = "configs/embedded/config.fp32.json", progress: bool = True) -> str:
    """Train the FP32 network that ``cfg`` starts from when its checkpoint is missing (embedded default only)."""
    from labkit.train import train

    path = cfg["network"].get("pretrained")
    if not path or Path(path).is_file():
        return path
    if cfg["data"]["name"] != "embedded":
        raise FileNotFoundError(f"network.pretrained '{path}' not found: convert torchvision weights "
                                "(notebook 01 / labkit convert) or train the FP32 network first (notebook 02)")
    print(f"{path} is missing: training the FP32 network first ({fp32_config})")
    fp32 = load_config(fp32_config)
    train(fp32, Path(path).parent, progress=progress)
    return path


def run_notebooks(output_dir: str = "runs/lab", names=MAIN_FLOW, parameters: dict | None = None,
                  log=print) -> list[Path]:
    """Execute notebooks in order with papermill into ``output_dir`` (each writes its runs below it)."""
    import papermill

    out = resolve(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    executed = []
    for name in names:
        source = resolve(f"{NOTEBOOK_DIR}/{name}.ipynb", must_exist=True)
        target = out / f"{name}.ipynb"
        log(f"running {source.name} -> {target}")
        papermill.execute_notebook(str(source), str(target), parameters=(parameters or {}).get(name, {}),
                                   cwd=str(source.parent), progress_bar=False, kernel_name="python3")
        executed.append(target)
    return executed
