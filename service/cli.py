"""The ``prunepilot`` command line. Bad input exits non-zero with one clear line, never a traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

# Only torch-free modules at the top (tests/test_lazy_imports.py): every command pays for these
# imports, and status, submit, keys or db need nothing of the engine. The rest loads where used.
from prunepilot.compression.errors import PrunePilotError, StrategyError
from prunepilot.compression.strategy import CRITERIA, PruningConstraints

from .settings import get_settings

if TYPE_CHECKING:
    from torch import nn

    from prunepilot.compression import Pruner
    from prunepilot.compression.graph import PruningGraph
    from prunepilot.compression.sources import InputSpec, ModelSource

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="prunepilot: per-layer pruning ratios under a budget.")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


ModelOpt = Annotated[str, typer.Option("--model", "--arch", help="the model: a built-in name (e.g. resnet56), timm:<name>, "
                                      "plugin:<name>, or a path to an .onnx file")]
InputSizeOpt = Annotated[int | None, typer.Option(help="input resolution in pixels (default: the model's own fixed size, else the "
                                                  "images' native size; 32 where there are no images)")]
LatencyBackendOpt = Annotated[str, typer.Option("--latency-backend", help="where latency is measured: torch (PyTorch eager on "
                                                 "this CPU), onnxruntime (ONNX Runtime, CPU execution provider) or cuda")]
RoundToOpt = Annotated[str | None, typer.Option(help="round kept channels to a multiple (an integer), or 'measured': down to the "
                                                "latency table's efficient counts, up to the smallest from below them (builds the table for "
                                                "--latency-backend); default: 'measured' for onnxruntime, none otherwise (1 turns it off)")]
MeanOpt = Annotated[str | None, typer.Option(help="input normalization mean R,G,B on a 0-1 scale (default: the model's own, else ImageNet's)")]
StdOpt = Annotated[str | None, typer.Option(help="input normalization std R,G,B (default: as --mean)")]


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected three numbers like 0.485,0.456,0.406, got {text!r}", param_hint=flag) from None


@dataclass
class _Model:
    source: ModelSource
    inputs: InputSpec
    dense: nn.Module
    num_classes: int

    @property
    def size(self) -> int:
        """The resolution shapes are counted at when no data set decides it."""
        return self.inputs.size or 32


def _open_model(model: str, weights: Path | None, input_size: int | None, mean: str | None, std: str | None) -> _Model:
    """The model named on the command line, with its weights (random ones for shapes only, where allowed);
    an ONNX file is checked against ONNX Runtime before anything else runs on it."""
    from prunepilot.compression.sources import ModelSource

    from .workspace import classes_of, load_user_model, model_inputs

    source = ModelSource.parse(model)
    inputs = model_inputs(source, input_size, _floats(mean, "--mean"), _floats(std, "--std"))
    if source.carries_weights or weights is not None:
        dense, num_classes = load_user_model(source, weights)
    else:
        dense = source.build()
        num_classes = classes_of(dense, inputs.size or 32)
    if source.carries_weights:
        from prunepilot.compression.onnx_io import check_against_onnxruntime

        assert source.file is not None  # parsed from a path
        check_against_onnxruntime(dense, source.file, input_size=inputs.size or 32)
    return _Model(source, inputs, dense, num_classes)


def _triple(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _round_to(value: str | None, latency_backend: str) -> int | Literal["measured"] | None:
    """--round-to: a positive integer or 'measured' (one CLI line otherwise); not given, the
    default of the latency backend's target (``LatencyTarget.default_round_to``)."""
    from prunepilot.compression.backends import LatencyTarget

    if value is None:
        return LatencyTarget(latency_backend).default_round_to  # an unknown backend is one CLI line (PrunePilotError)
    if value == "measured":
        return "measured"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        _fail(f"--round-to must be a positive integer or 'measured', got {value!r}")
    return n


def _latency_table(graph: PruningGraph, model: nn.Module, backend_name: str, batch: int, threads: int,
                   recalibrate: bool = False) -> tuple[Any, int]:
    """This machine's latency table for ``model`` on ``backend_name``, built (or reused) in the
    service's database with a progress bar, and the entries measured now; calibrated (the stored
    calibration of this model here, unless ``recalibrate``)."""
    from tqdm import tqdm

    from prunepilot.compression.backends import local_backend
    from prunepilot.compression.latency import LatencyTable

    from .db.migrate import ensure_current
    from .db.store import JobStore
    from .latency_store import SqlLatencyStore

    settings = get_settings()
    ensure_current(settings.db_url)
    table = LatencyTable(graph, model, SqlLatencyStore(JobStore(settings.db_url)), batch, threads, backend=local_backend(backend_name, threads))
    todo = len(table.missing())
    with tqdm(total=todo, desc=f"measuring layers ({backend_name})", unit="entry", disable=todo == 0) as bar:
        measured = table.build(progress=lambda done, total: bar.update(done - bar.n))
    table.calibrated(repeats=settings.calibration_repeats, refresh=recalibrate)
    return table, measured


def _measured_steps(pruner: Pruner, backend_name: str, threads: int) -> None:
    """round_to='measured': give ``pruner``'s constraints the latency table's channel steps."""
    import dataclasses

    if pruner.constraints.round_to != "measured" or not pruner.layers:
        return
    table, _ = _latency_table(pruner.graph, pruner.model, backend_name, 1, threads)  # the steps use the calibrated alignment
    lowest = pruner.constraints.lowest_vector(pruner.graph.channels)
    pruner.constraints = dataclasses.replace(pruner.constraints, steps=table.channel_steps(lowest))


def _pruner(m: _Model, constraints: PruningConstraints | None = None) -> Pruner:
    from .workspace import make_pruner

    return make_pruner(m.source, m.dense, m.num_classes, m.size, constraints)


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


@app.command()
def profile(
    model: ModelOpt,
    weights: Annotated[Path | None, typer.Option(help="state dict or safetensors (optional: shapes only)")] = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Print the prunable layers in depth order with their shapes and costs."""
    m = _open_model(model, weights, input_size, mean, std)
    arch = m.source.ref
    graph = _pruner(m).graph
    if as_json:
        console.print_json(json.dumps([layer.__dict__ for layer in graph.layers]))
        return
    console.print(f"input: {m.size}x{m.size} RGB, mean {_triple(m.inputs.mean)}, std {_triple(m.inputs.std)}", highlight=False)
    table = Table(title=f"{arch}: {len(graph.layers)} prunable layers, {_human(graph.dense_macs)} MACs, {_human(graph.dense_params)} params")
    for col in ("#", "layer", "type", "N", "C_in", "C_out", "H", "W", "k", "s", "MACs", "params", "coupled"):
        table.add_column(col, justify="right" if col not in ("layer", "type") else "left")
    for layer in graph.layers:
        table.add_row(str(layer.index), layer.name, layer.type, str(layer.n), str(layer.c_in), str(layer.c_out), str(layer.h),
                      str(layer.w), str(layer.kernel), str(layer.stride), _human(layer.flops), _human(layer.params),
                      str(len(layer.coupled)))
    console.print(table)


@app.command()
def inspect(
    model: ModelOpt,
    weights: Annotated[Path | None, typer.Option(help="state dict or safetensors (optional: random weights show the same structure)")] = None,
    budget: Annotated[list[str] | None, typer.Option(help="say whether this budget is reachable: flops=0.5, size=1MB, ... (repeatable)")] = None,
    evaluations: Annotated[int, typer.Option(help="evaluations of the search to estimate the time of")] = 60,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    max_ratio: Annotated[float, typer.Option(help="largest ratio any layer may take")] = 0.8,
    exclude: Annotated[list[str] | None, typer.Option(help="a layer to leave whole (repeatable)")] = None,
    latency: Annotated[bool, typer.Option("--latency", help="build (or reuse) this machine's latency table for the model and add the "
                                          "latency floor, each layer's latency curve and the predicted speedups")] = False,
    latency_backend: LatencyBackendOpt = "torch",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Prunability report before any search: prunable channel groups, layers left whole and why, the
    reachable floor of each resource, dense figures, and the time a search would take here. With
    --latency: whether pruning makes the model faster on --latency-backend, and by how much."""
    from prunepilot.compression import Budget, parse_constraint
    from prunepilot.compression.inspect import timed_report

    settings = get_settings()
    m = _open_model(model, weights, input_size, mean, std)
    pruner = _pruner(m, PruningConstraints(max_ratio=max_ratio, exclude=tuple(exclude or ())))
    table = None
    wanted = Budget(constraints=[parse_constraint(b) for b in budget]) if budget else None
    outlook = None
    if latency and pruner.layers:
        from prunepilot.compression.inspect import latency_outlook, latency_problems

        latency_batch = wanted.get("latency").batch_size if wanted is not None and wanted.get("latency") is not None else 1  # type: ignore[union-attr]
        table, _ = _latency_table(pruner.graph, pruner.model, latency_backend, latency_batch, settings.threads)
        outlook = latency_outlook(pruner, table, wanted)
    report = timed_report(pruner, evaluations, settings.threads, latency_table=table)
    problems = report.below_floor(wanted) if wanted is not None else []
    if outlook is not None and wanted is not None:
        problems = [*latency_problems(pruner, table, wanted), *(p for p in problems if not p.startswith("latency"))]
    if as_json:
        console.print_json(json.dumps({**report.to_dict(), "budget_problems": problems,
                                       "latency": outlook.to_dict() if outlook is not None else None}))
    else:
        console.print(f"input: {m.size}x{m.size} RGB, mean {_triple(m.inputs.mean)}, std {_triple(m.inputs.std)}", highlight=False)
        console.print(report.table(), highlight=False, markup=False)
        if outlook is not None:
            console.print("\n" + outlook.table(), highlight=False, markup=False)
        if budget and not problems:
            console.print(f"budget {', '.join(budget)}: reachable", highlight=False)
    if problems:
        _fail("; ".join(problems), code=1)
    if not pruner.layers:
        _fail(f"{m.source.ref} has no prunable layers (see above)", code=1)


def _load_strategy(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StrategyError(f"cannot read strategy file {path}: {exc}") from None
    data = data.get("strategy", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise StrategyError(f"{path}: expected a JSON object {{layer: ratio}}")
    return {str(k): float(v) for k, v in data.items()}


@app.command()
def prune(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="output directory for the artifact and report")],
    weights: Annotated[Path | None, typer.Option(help="state dict (.pt/.th) or .safetensors (not for an .onnx model)")] = None,
    data: Annotated[str, typer.Option(help="cifar10-jpeg, a data set registered in PRUNEPILOT_DATASETS, or an ImageFolder "
                                           "directory / zip (a directory larger than PRUNEPILOT_MAX_DECODED_BYTES decoded is "
                                           "streamed from its files)")] = "cifar10-jpeg",
    budget: Annotated[list[str] | None, typer.Option(help="prune uniformly as little as meets it: flops=0.5, params=40%, size=1MB (repeatable)")] = None,
    uniform: Annotated[float | None, typer.Option(help="one sparsity ratio for every prunable layer, in [0, 1)")] = None,
    strategy: Annotated[Path | None, typer.Option(help="JSON file {layer: ratio}")] = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    criterion: Annotated[str, typer.Option(help=f"channel importance: {', '.join(CRITERIA)}")] = "l2",
    round_to: RoundToOpt = None,
    latency_backend: LatencyBackendOpt = "torch",
    max_ratio: Annotated[float, typer.Option(help="largest ratio any layer may take")] = 0.8,
    exclude: Annotated[list[str] | None, typer.Option(help="a layer to leave whole (repeatable; names as `prunepilot profile` lists them)")] = None,
    finetune_epochs: Annotated[float, typer.Option(help="epochs of fine-tuning after pruning")] = 0.0,
    lr: Annotated[float, typer.Option(help="fine-tune learning rate")] = 0.01,
    distill: Annotated[bool, typer.Option(help="distil from the dense model while fine-tuning")] = False,
    finetune_dense: Annotated[bool, typer.Option(help="also fine-tune the dense model with the same budget")] = False,
    test_images: Annotated[int | None, typer.Option(help="evaluate on a class-stratified subset of the test split")] = None,
    device: Annotated[str | None, typer.Option(help="compute device of BN re-estimation, fine-tuning and test accuracy: auto "
                                               "(CUDA when present), cpu, cuda or cuda:N (default: PRUNEPILOT_DEVICE, auto); "
                                               "latency is still measured on this machine's CPU")] = None,
) -> None:
    """Prune to a budget, a uniform ratio or a strategy file; fine-tune, measure, write artifact + report
    (an .onnx model also gets OUT/model.onnx, checked in ONNX Runtime)."""
    settings = get_settings()
    from prunepilot.compression.compute_device import describe as describe_device
    from prunepilot.compression.compute_device import resolve_device

    compute = resolve_device(device or settings.device)  # before anything is loaded: `--device cuda` without CUDA is one line
    if sum(x is not None for x in (budget or None, uniform, strategy)) != 1:
        _fail("give exactly one of --budget, --uniform or --strategy")
    if uniform is not None and not 0.0 <= uniform < 1.0:
        _fail(f"--uniform must be in [0, 1), got {uniform}")
    if criterion not in CRITERIA:
        _fail(f"unknown --criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    import torch

    torch.set_num_threads(settings.threads)
    from prunepilot.agents.pipeline import FinalConfig, PipelineHooks, finish
    from prunepilot.compression import FinetuneConfig, save_artifact, uniform_strategy
    from prunepilot.compression.backends import LatencyTarget

    from .workspace import open_session

    m = _open_model(model, weights, input_size, mean, std)  # checks the model (and its weights) before the data set is decoded
    constraints = PruningConstraints(max_ratio=max_ratio, round_to=_round_to(round_to, latency_backend), exclude=tuple(exclude or ()))
    if constraints.round_to == "measured":  # the backend is checked before the data set is decoded
        from prunepilot.compression.backends import local_backend

        local_backend(latency_backend, settings.threads)
    early = _pruner(m, constraints)  # a misspelt layer or an unreachable budget fails here, before the data is decoded
    if not early.layers:
        _fail(f"{m.source.ref} has no prunable layers" + (" left after the exclusions" if constraints.exclude else "")
              + ": `prunepilot inspect` says why")
    from prunepilot.compression import Budget, from_vector, parse_constraint
    from prunepilot.compression.budget import analytic_checker, uniform_within

    wanted = Budget(constraints=[parse_constraint(b) for b in budget]) if budget else None
    if wanted is not None:
        uniform_within(analytic_checker(m.dense, early.graph, early.constraints, wanted))
    session = open_session(m.source, weights, data, settings, constraints, criterion, progress=True, inputs=m.inputs)
    pruner = session.pruner
    _measured_steps(pruner, latency_backend, settings.threads)
    said: list[str] = []
    limits: dict[str, float] = {}  # the budget's, as shares of dense
    if wanted is not None:
        checker = analytic_checker(session.model, pruner.graph, pruner.constraints, wanted)
        limits = checker.limits
        ratios = uniform_within(checker)
        chosen = from_vector(ratios, pruner.layer_names)
        said.append(f"budget {wanted.describe()}: every prunable layer pruned by {float(ratios.max()):.1%} of its channels "
                    f"({len(pruner.layers)} layers; the least uniform pruning that meets it; `prunepilot submit` searches per-layer ratios)")
    elif uniform is not None:
        chosen = uniform_strategy(pruner.layer_names, uniform)
        said.append(f"every prunable layer pruned by {uniform:.0%} of its channels ({len(pruner.layers)} layers, residual "
                    "channels included, so MACs fall roughly with the square of the kept share)")
    else:
        assert strategy is not None  # exactly one of the three, checked above
        chosen = _load_strategy(strategy)
    config = FinetuneConfig(epochs=finetune_epochs, lr=lr, distill=distill)
    from tqdm import tqdm

    total = config.total_steps(len(session.splits.train))
    with tqdm(total=total, desc="fine-tuning", unit="step", disable=total == 0, mininterval=1.0) as bar:
        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        result = finish(pruner, session.splits, chosen,
                        FinalConfig(finetune=config, finetune_dense=finetune_dense, test_images=test_images,
                                    target=LatencyTarget(backend=latency_backend)),
                        PipelineHooks(threads=settings.threads, on_finetune_step=on_step, device=compute,
                                      gpu_eval_batch=settings.gpu_eval_batch))
    said.append("BatchNorm statistics were re-estimated on training images after pruning"
                + (f", then fine-tuned {finetune_epochs:g} epoch(s)" if finetune_epochs else
                   "; no fine-tuning (--finetune-epochs 0), so expect a large accuracy drop: fine-tune with "
                   "--finetune-epochs N, or search per-layer ratios with `prunepilot submit`"))
    report: dict[str, Any] = {"arch": m.source.ref, "weights": str(weights) if weights else None, "data": data, "criterion": criterion,
                              "data_splits": session.splits.describe(), "compute_device": describe_device(compute),
                              "finetune": config.__dict__, **result.report()}
    if wanted is not None:  # the budget held to the final network, as a job's report does
        report["budget"] = wanted.describe()
        report["budget_check"] = wanted.check_measured(limits, result.usage(1))
    save_artifact(result.pruned.model, result.pruned.spec, out, report)
    _print_final(report)
    for line in said:
        console.print(line, highlight=False)
    for warning in session.splits.warnings():
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(f"artifact: {out.resolve()}  (load with prunepilot.compression.load_artifact)")
    if m.source.carries_weights:
        from prunepilot.compression import export_format

        console.print(f"ONNX:     {export_format(out, 'onnx').resolve()}  (checked against the pruned model in ONNX Runtime)")


def _print_final(report: dict[str, Any]) -> None:
    figs = report["figures"]
    table = Table(title=f"test accuracy on {report['test_images']} images")
    table.add_column("")
    for name in figs:
        table.add_column(name.replace("_", " "), justify="right")
    rows: list[tuple[str, Callable[..., str]]] = [
        ("accuracy", lambda f: f"{f['accuracy']:.2%}"),
        ("MACs", lambda f: _human(f["macs"])),
        ("params", lambda f: _human(f["params"])),
        ("size", lambda f: _human(f["size_bytes"], "B")),
    ]
    for batch in figs["dense"]["latency_ms"]:
        rows.append((f"latency b{batch}", lambda f, b=batch: f"{f['latency_ms'][b]:.2f} ms"))
    for label, fmt in rows:
        table.add_row(label, *[fmt(f) for f in figs.values()])
    console.print(table)
    speed = ", ".join(f"b{b}: {s:.2f}x" for b, s in report["latency_speedup"].items())
    console.print(f"MACs kept {report['macs_ratio']:.1%}, params kept {report['params_ratio']:.1%}, speedup {speed}, "
                  f"accuracy drop {report['accuracy_drop'] * 100:.2f} pt")
    for resource, check in report.get("budget_check", {}).items():  # absent from reports of older versions
        measured = "not measured" if check["measured"] is None else f"{check['measured']:.1%} of dense"
        verdict = "met" if check["met"] else "[red]over the budget[/]"
        console.print(f"budget {resource}: {measured} as measured, limit {check['limit']:.1%} "
                      f"(tolerance {check['tolerance']:.1%}): {verdict}")


db_app = typer.Typer(help="Database migrations (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Create or migrate the database to the latest schema."""
    from .db.migrate import current_revision, upgrade

    url = get_settings().db_url
    upgrade(url, revision)
    console.print(f"database at revision {current_revision(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="target revision, e.g. -1 or base")]) -> None:
    """Step the schema back (data in dropped tables is lost)."""
    from .db.migrate import current_revision, downgrade

    url = get_settings().db_url
    downgrade(url, revision)
    console.print(f"database at revision {current_revision(url)}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the code's head."""
    from .db.migrate import current_revision, head_revision

    url = get_settings().db_url
    console.print(f"current: {current_revision(url)}  head: {head_revision(url)}")


latency_app = typer.Typer(help="Per-device latency lookup tables.", no_args_is_help=True)
app.add_typer(latency_app, name="latency")


@latency_app.command("build")
def latency_build(
    model: ModelOpt,
    weights: Annotated[Path | None, typer.Option(help="weights (their shapes decide the layers; optional)")] = None,
    input_size: InputSizeOpt = None,
    batch: Annotated[int, typer.Option(help="batch size the table is for")] = 1,
    latency_backend: LatencyBackendOpt = "torch",
    recalibrate: Annotated[bool, typer.Option(help="time the model whole again and replace its stored calibration (the fit "
                                              "of the entries to whole-network latency that later jobs reuse)")] = False,
) -> None:
    """Measure (or reuse) the table for this machine, stored in the database, and calibrate it for the
    model (once: later jobs and inspections reuse the fit); Ctrl-C keeps what was measured."""
    import torch

    from prunepilot.compression.graph import PruningGraph

    settings = get_settings()
    torch.set_num_threads(settings.threads)
    m = _open_model(model, weights, input_size, None, None)
    arch = m.source.ref
    table, todo = _latency_table(PruningGraph(m.dense, m.size), m.dense, latency_backend, batch, settings.threads, recalibrate)
    info = table.summary()
    console.print(f"{arch}: {info['entries']} entries on {info['device']} ({todo} measured now); calibration {info['calibration']}: "
                  f"dense {info['dense_ms']:.2f} ms "
                  f"= {info['remainder_ms']:.2f} ms fixed + {info['scale']:.2f} x layer entries"
                  + (f" (+ {info['penalty_ms']:.2f} ms with every layer off multiples of {info['alignment']})" if info["alignment"] != 1 else ""))


keys_app = typer.Typer(help="API keys (bearer tokens).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option(help="who or what the key is for")] = "local",
                device: Annotated[str | None, typer.Option(help="a device key for this device (declared now if new): it can only "
                                                           "register the device's agent and fetch and answer its measurement "
                                                           "tasks")] = None) -> None:
    """Create an API key; it is shown once and stored only as a hash."""
    from .auth import create_key
    from .db.migrate import ensure_current

    url = get_settings().db_url
    ensure_current(url)
    key_id, secret = create_key(url, name, device=device)
    console.print(f"key {key_id} ({name}{', device ' + device if device else ''}): {secret}", highlight=False)


@keys_app.command("list")
def keys_list() -> None:
    from .db import repo
    from .db.engine import session_scope

    with session_scope(get_settings().db_url) as s:
        for k in repo.list_api_keys(s):
            scope = f"device {k.device}" if k.scope == "device" else "user"
            console.print(f"{k.id}\t{k.name}\t{k.prefix}...\t{scope}\t{'revoked' if k.revoked_at else 'active'}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(key_id: int) -> None:
    from .db import repo
    from .db.engine import session_scope

    with session_scope(get_settings().db_url) as s:
        if not repo.revoke_api_key(s, key_id=key_id):
            _fail(f"no active key {key_id}")
    console.print(f"key {key_id} revoked")


devices_app = typer.Typer(help="Devices (remote latency targets) and their tables.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")


@devices_app.command("list")
def devices_list() -> None:
    """Declared devices: runtime, whether an agent is connected, latency-table entries, tasks."""
    from .db.migrate import ensure_current
    from .devices import DeviceService

    settings = get_settings()
    ensure_current(settings.db_url)
    for d in DeviceService(settings).list_devices(owner_id=None):
        state = "connected" if d.connected else ("registered" if d.fingerprint else "never registered")
        console.print(f"{d.name}\t{d.backend or '-'}\t{state}\t{d.entries} entries\t{d.calibrations} calibrated model(s)\t{d.tasks['open']} open / {d.tasks['done']} done tasks"
                      f"\t{len(d.jobs)} job(s)", highlight=False)


@devices_app.command("remove")
def devices_remove(name: str,
                   keep_table: Annotated[bool, typer.Option(help="keep the device's latency-table entries and calibrations (a device declared "
                                                                  "again under this name with the same fingerprint reuses them)")] = False) -> None:
    """Remove a device: its measurement tasks, its keys (revoked) and its latency table. Refused while
    an unfinished job targets it."""
    from .db.migrate import ensure_current
    from .devices import DeviceService

    settings = get_settings()
    ensure_current(settings.db_url)
    try:
        gone = DeviceService(settings).remove(name, keep_table=keep_table)
    except PrunePilotError as exc:
        _fail(str(exc))
        return
    console.print(f"device {name} removed: {gone['tasks']} task(s), {gone['keys_revoked']} key(s) revoked, "
                  f"{gone['entries']} latency-table entr{'y' if gone['entries'] == 1 else 'ies'}, "
                  f"{gone['calibrations']} calibration{'' if gone['calibrations'] == 1 else 's'}", highlight=False)


@devices_app.command("reset-calibrations")
def devices_reset_calibrations(name: str) -> None:
    """Forget the device's stored calibrations (its table entries stay): the next job or inspection of
    each model on it times the model whole again, e.g. after one was calibrated while the board was busy."""
    from .db.migrate import ensure_current
    from .devices import DeviceService

    settings = get_settings()
    ensure_current(settings.db_url)
    try:
        gone = DeviceService(settings).reset_calibrations(name)
    except PrunePilotError as exc:
        _fail(str(exc))
        return
    console.print(f"device {name}: {gone} stored calibration{'' if gone == 1 else 's'} deleted; the next job or inspection of "
                  f"a model on it calibrates that model again", highlight=False)


@app.command("device-agent", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def device_agent(ctx: typer.Context) -> None:
    """Time measurement tasks for a device (run on the device): prunepilot device-agent --server URL --key KEY --name NAME
    [--backend onnxruntime] [--threads N] (--help for all). Needs only httpx, numpy and onnxruntime."""
    from .device_agent import main as agent_main

    raise typer.Exit(agent_main(ctx.args))


@app.command("gc")
def gc_files() -> None:
    """Remove the files of jobs failed or cancelled over PRUNEPILOT_FAILED_JOB_RETENTION_DAYS ago (rows and trials stay)."""
    from .db.migrate import ensure_current
    from .retention import sweep

    settings = get_settings()
    ensure_current(settings.db_url)
    result = sweep(settings)
    console.print(result.summary(), highlight=False, soft_wrap=True)
    if result.errors:
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
    migrate: Annotated[bool, typer.Option(help="run database migrations before serving")] = True,
) -> None:
    """Run the API, the dashboard and the job dispatcher (embedded Ray unless PRUNEPILOT_RAY_ADDRESS is set)."""
    import uvicorn

    from .app import create_app
    from .db.migrate import ensure_current, upgrade

    settings = get_settings()
    if migrate:
        upgrade(settings.db_url)
    ensure_current(settings.db_url)  # a clear one-line error instead of a failed startup
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_level="warning")


def _client(url: str | None, key: str | None):
    import os

    from .client import Client

    settings = get_settings()
    return Client(url or os.environ.get("PRUNEPILOT_URL") or f"http://{settings.host}:{settings.port}",
                  key or os.environ.get("PRUNEPILOT_API_KEY"))


def _progress_wait(client, job_id: str) -> dict:
    from tqdm import tqdm

    with tqdm(total=100, desc="queued", unit="%", bar_format="{desc:<34} {bar} {n:.0f}%") as bar:
        def update(job: dict) -> None:
            phase = job["status"]
            pct = 80 * job["progress"] + 20 * job["finetune_progress"]
            best = f" best {job['best_accuracy']:.1%}" if job.get("best_accuracy") is not None else ""
            bar.set_description_str(f"{phase} {job['evaluations']} evals{best}")
            bar.n = round(pct, 1)
            bar.refresh()

        return client.wait(job_id, poll_s=1.0, on_update=update)


def _agent_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--option")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


@app.command()
def submit(
    model: ModelOpt,
    budget: Annotated[list[str], typer.Option(help="e.g. flops=0.5, latency=8ms, size=1MB (repeatable)")],
    weights: Annotated[Path | None, typer.Option(help="state dict or safetensors (not for an .onnx model)")] = None,
    agent: Annotated[str, typer.Option(help="search agent")] = "optuna-tpe",
    option: Annotated[list[str] | None, typer.Option(help="agent option KEY=VALUE, value as JSON or text (repeatable)")] = None,
    data: Annotated[str, typer.Option(help="cifar10-jpeg, the name of a data set registered on the server, or a path to an "
                                           "ImageFolder zip (uploaded)")] = "cifar10-jpeg",
    evaluations: Annotated[int, typer.Option(help="evaluation budget of the search")] = 60,
    finetune_epochs: Annotated[float, typer.Option(help="final fine-tune epochs")] = 1.0,
    exclude: Annotated[list[str] | None, typer.Option(help="a layer to leave whole (repeatable; names as `prunepilot profile` lists them)")] = None,
    round_to: RoundToOpt = None,
    latency_backend: LatencyBackendOpt = "torch",
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    name: Annotated[str | None, typer.Option(help="a label for the job")] = None,
    wait: Annotated[bool, typer.Option(help="poll with a progress bar until the job ends, then print its final report")] = False,
    url: Annotated[str | None, typer.Option(help="API base URL (or PRUNEPILOT_URL)")] = None,
    key: Annotated[str | None, typer.Option(help="API key (or PRUNEPILOT_API_KEY)")] = None,
) -> None:
    """Submit a job to a running service."""
    from prunepilot.compression import parse_constraint

    constraints = [parse_constraint(b).model_dump(exclude_none=True) for b in budget]
    options = dict(_agent_option(o) for o in option or [])
    onnx_file = Path(model) if model.lower().endswith(".onnx") else None
    if onnx_file is not None and not onnx_file.is_file():
        _fail(f"ONNX file not found: {model}")
    upload = data != "cifar10-jpeg" and (Path(data).is_file() or data.lower().endswith(".zip"))  # else a name on the server
    if upload and not Path(data).is_file():
        _fail(f"data zip not found: {data}")
    spec: dict[str, Any] = {
        "arch": "onnx" if onnx_file else model, "agent": agent, "agent_options": options, "budget": {"constraints": constraints},
        "search": {"max_evaluations": evaluations}, "finetune": {"epochs": finetune_epochs},
        # no --round-to: the server applies the target's default
        "constraints": {"exclude": list(exclude or [])} | ({} if round_to is None else {"round_to": _round_to(round_to, latency_backend)}),
        "target": {"backend": latency_backend},
        "image_size": input_size,
        "mean": _floats(mean, "--mean"), "std": _floats(std, "--std"),
        "dataset": "upload" if upload else data, "name": name}
    with _client(url, key) as client:
        job = client.submit(spec, weights, data if upload else None, model=onnx_file)
        console.print(f"job {job['id']} {job['status']}  (dashboard: {client.base_url}{job['links']['dashboard']})")
        if wait:
            job = _progress_wait(client, job["id"])
            console.print(f"job {job['id']} {job['status']}" + (f": {job['error']}" if job.get("error") else ""))
            if job["status"] != "succeeded":
                raise typer.Exit(1)
            _print_final(client.report(job["id"]))


@app.command()
def status(job_id: str, url: Annotated[str | None, typer.Option()] = None, key: Annotated[str | None, typer.Option()] = None) -> None:
    """Show a job."""
    with _client(url, key) as client:
        console.print_json(json.dumps(client.job(job_id)))


@app.command()
def download(job_id: str, out: Annotated[Path, typer.Option(help="directory")],
             format: Annotated[str | None, typer.Option(help="state_dict, pt2 or onnx (default: onnx for a job on an .onnx model, else state_dict)")] = None,  # noqa: A002
             url: Annotated[str | None, typer.Option()] = None, key: Annotated[str | None, typer.Option()] = None) -> None:
    """Download a finished job's pruned model."""
    with _client(url, key) as client:
        console.print(f"saved {client.download(job_id, out, format)}")


@app.command()
def demo(
    agent: Annotated[str, typer.Option(help="search agent")] = "optuna-tpe",
    evaluations: Annotated[int, typer.Option(help="evaluation budget")] = 30,
    finetune_epochs: Annotated[float, typer.Option(help="final fine-tune epochs")] = 1.0,
    out: Annotated[Path, typer.Option(help="where the pruned model goes")] = Path("runs/demo"),
    keep_serving: Annotated[bool, typer.Option("--serve", help="keep the service running afterwards (Ctrl-C stops it)")] = False,
) -> None:
    """End to end on the embedded default: start the service (SQLite + local Ray), submit ResNet-20 on
    CIFAR-10-JPEG at 50 % FLOPs through the HTTP API, wait, download the model, print the results."""
    from .auth import create_key
    from .client import Client
    from .db.migrate import upgrade
    from .pgserver import free_port
    from .process import ServiceProcess

    settings = get_settings()
    weights = settings.shared_weights_dir / "resnet20-cifar10.th"
    if not weights.is_file():
        _fail(f"demo weights not found at {weights} (set PRUNEPILOT_SHARED_WEIGHTS_DIR)")
    upgrade(settings.db_url)
    _, secret = create_key(settings.db_url, "demo")
    port = settings.port if _port_free(settings.host, settings.port) else free_port()
    service = ServiceProcess(settings.data_dir, port=port, host=settings.host)
    console.print(f"starting the service at {service.url} (data in {settings.data_dir}, log {service.log})")
    try:
        service.start(migrate=False)
        client = Client(service.url, secret)
        spec = {"arch": "resnet20", "dataset": "cifar10-jpeg", "agent": agent, "name": "demo",
                "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
                "search": {"max_evaluations": evaluations}, "finetune": {"epochs": finetune_epochs}}
        job = client.submit(spec, weights)
        console.print(f"submitted job {job['id']} ({agent}, {evaluations} evaluations, {finetune_epochs:g} epoch fine-tune)")
        job = _progress_wait(client, job["id"])
        if job["status"] != "succeeded":
            _fail(f"job {job['status']}: {job.get('error')}")
        target = client.download(job["id"], out / job["id"])
        _print_final(client.report(job["id"]))
        console.print(f"pruned model: {target.resolve()}  (prunepilot.compression.load_artifact)")
        console.print(f"dashboard:    {service.url}/dashboard#key={secret}")
        console.print(f"API key:      {secret}")
        if keep_serving:
            console.print("serving; Ctrl-C stops")
            service.wait()
        else:
            console.print("the service stops now; `prunepilot serve` starts it again (same data, same key)")
    except RuntimeError as exc:
        _fail(str(exc).splitlines()[0])
    finally:
        service.stop()


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def main() -> None:
    try:
        app()
    except PrunePilotError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except Exception as exc:
        from .client import ApiError

        if isinstance(exc, ApiError):
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(2)
        import httpx

        if isinstance(exc, httpx.ConnectError):
            err.print(f"[bold red]error:[/] cannot reach the service ({exc}); is `prunepilot serve` running?", highlight=False)
            sys.exit(2)
        from pydantic import ValidationError

        if isinstance(exc, ValidationError) and exc.title == "Settings":  # a PRUNEPILOT_* variable that does not parse
            first = exc.errors()[0]
            name = "PRUNEPILOT_" + "_".join(str(part) for part in first["loc"][:1]).upper()
            err.print(f"[bold red]error:[/] setting {name}: {first['msg']}", highlight=False)
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
