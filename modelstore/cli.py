"""The `modelstore` command line."""

from __future__ import annotations

import json
import math
import signal
import sys
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import click
from click.core import ParameterSource

from modelstore import __version__
from modelstore._runtime.progress import counter
from modelstore._runtime.units import human_bytes, percent
from modelstore.api import add_lora_task as add_lora
from modelstore.api import add_task as add_fft
from modelstore.api import open_store
from modelstore.build import build as build_store
from modelstore.build import init as init_store
from modelstore.config import FIDELITY_KEYS, BuildConfig, load_config
from modelstore.errors import InputError, ModelStoreError
from modelstore.evaluation.outputs import evaluate
from modelstore.evaluation.weights import verify as run_verify
from modelstore.format.codecs import BASE_CODECS
from modelstore.format.manifest import FidelityRecord, TaskEntry
from modelstore.kinds import KINDS, checkpoint_kind, checkpoint_kinds, get_kind
from modelstore.merging import METHODS, method_class, method_names
from modelstore.options import Option
from modelstore.serving.export import FORMATS, MAX_SHARD_SIZE
from modelstore.serving.export import export as export_task
from modelstore.storage.transfer import sync as run_sync
from modelstore.store import Store, env_storage_options

#: Exit statuses (docs/cli.md): a script tells a failed check from a crash by them.
EXIT_ERROR = 1  # the command could not do its work (a bad input, a missing store, an outage)
EXIT_USAGE = 2  # click's status for a malformed command line
EXIT_FOUND = 3  # check, verify or eval ran and found damage or a miss
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (`kill`, a container stopped, a job's time limit)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so a write cleans up after it the same way."""


def _warning_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    click.echo(f"Warning: {message}", err=True)


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            raise InputError(f"{flag} takes NAME=VALUE, got {v!r}")
        if key in out:
            raise InputError(f"{flag} names {key!r} twice")
        out[key] = val
    return out


def _json_pairs(values: tuple[str, ...], flag: str) -> dict[str, Any]:
    """KEY=VALUE options whose values are JSON when they parse as JSON (numbers, objects), else strings."""
    out: dict[str, Any] = {}
    for k, v in _pairs(values, flag).items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _storage_options(ctx: click.Context) -> dict[str, Any] | None:
    return ctx.obj.get("storage_options") or None


def _open(ctx: click.Context, store: str) -> Store:
    return open_store(store, storage_options=_storage_options(ctx))


def _emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _progress(ctx: click.Context, as_json: bool = False) -> bool:
    """Whether a command draws progress bars (on a terminal only: modelstore._runtime.progress)."""
    return not (ctx.obj.get("quiet") or as_json)


def _report(ctx: click.Context, as_json: bool, data: Callable[[], Any], line: str) -> None:
    """A command's result: JSON with --json (`data()`, made only then: it may read the store
    again), else one line unless --quiet."""
    if as_json:
        _emit(data())
    elif not ctx.obj.get("quiet"):
        click.echo(line)


def _written(s: Store, task: str) -> dict[str, Any]:
    """What a write of `task` stored (the --json report of add-task and build)."""
    e = s.info(task)
    params = sum(math.prod(t["shape"]) for t in s.table(task))
    return {"task": task, "kind": e["kind"], "method": e["method"], "base": e["base"], "bytes": e["bytes"],
            "full_bytes": e.get("full_bytes"), "params": params,
            "bits_per_param": e["bytes"] * 8 / params if params else None,
            "setting": get_kind(e["kind"]).setting(cast(TaskEntry, e)), "fidelity": e.get("fidelity")}


_json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")


def _fidelity_options(f: Callable) -> Callable:
    """The targets of calibrated writes (modelstore.fidelity), shared by add-task and build."""
    for decorate in reversed([
        click.option("--min-agreement", type=float, default=None,
                     help="with --calibration: top-1 agreement with the original to meet [default: 0.99]"),
        click.option("--max-kl", type=float, default=None,
                     help="with --calibration: instead, the mean KL(original || stored) to stay under"),
        click.option("--device", default=None, help="with --calibration: where the models run (cpu, cuda, cuda:1) "
                     "[default: cpu]"),
        click.option("--max-examples", type=int, default=None,
                     help="with --calibration: N examples of the file are used, spread evenly over a longer one "
                          "[default: 256]"),
        click.option("--max-length", type=int, default=None,
                     help="with --calibration: tokens kept of each example, fewer where the model has fewer "
                          "positions (a QA context is read in windows) [default: 256]"),
        click.option("--bound", is_flag=True, default=None,
                     help="with --min-agreement X: the agreement's 95% lower bound over the calibration examples "
                          "must meet X, a promise for more data like them (at 0.99, 256 examples allow only exact)"),
    ]):
        f = decorate(f)
    return f


def _set_quiet(ctx: click.Context, _param: click.Parameter, quiet: bool) -> None:
    if quiet:
        ctx.ensure_object(dict)["quiet"] = True


def _fidelity(flags: dict[str, Any]) -> dict[str, Any]:
    """The fidelity flags given, as keywords of Store.add_task / build."""
    return {k: flags.pop(k) for k in FIDELITY_KEYS
            if flags.get(k) is not None and flags.get(k) is not False}  # a 0 is given (and refused), not left out


class _Command(click.Command):
    """A command whose unknown options are one line. Task names start with a letter or digit
    (format/paths.py), so `-x` where a task name goes is an unknown option, and says so. Each
    command also takes the group's `-q/--quiet` after its name, where users put it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self, click.Group):
            self.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                                            callback=_set_quiet, help="as `modelstore -q COMMAND`"))

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            takes_task = any(isinstance(p, click.Argument) and p.name in ("name", "task") for p in self.params)
            hint = "; task names start with a letter or digit" if takes_task else ""
            raise click.UsageError(f"no such option {e.option_name!r}{hint}; `{ctx.command_path} --help` "
                                   "lists the options") from None  # no context: the message alone, one line


class _Commands(_Command, click.Group):
    """The command group: every command's modelstore errors become one line on stderr and an
    exit status, never a traceback. Statuses are raised as SystemExit (not click's Exit, which
    `main(standalone_mode=False)` would return instead), so a caller running commands in-process
    sees them too."""

    command_class = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModelStoreError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt as e:
            click.echo(f"{'Terminated' if isinstance(e, _Terminated) else 'Interrupted'}: nothing partial was "
                       "committed; earlier tasks are intact.", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(e, _Terminated) else EXIT_INTERRUPTED)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True,
              help="no progress bars and no report on success (errors still print); also "
                   "$HF_HUB_DISABLE_PROGRESS_BARS=1 turns the bars off")
@click.option("-o", "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for the store location (e.g. endpoint_url=...); JSON values allowed. "
                   "Also read as a JSON object from $MODELSTORE_STORAGE_OPTIONS.")
@click.version_option(__version__, prog_name="modelstore")
@click.pass_context
def main(ctx: click.Context, quiet: bool, storage_option: tuple[str, ...]) -> None:
    """Keep many fine-tuned models of one pre-trained model as one base plus small task deltas."""
    ctx.obj = {"storage_options": env_storage_options(_json_pairs(storage_option, "--storage-option")), "quiet": quiet}
    warnings.showwarning = _warning_line


def run() -> None:
    """The `modelstore` program: `main`, with SIGTERM cleaned up after as Ctrl-C is (no partial
    task), ending with status 143."""
    def terminated(_signum: int, _frame: object) -> None:
        raise _Terminated()

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminated)
    main()


def _click_type(o: Option) -> Any:
    if o.choices:
        return click.Choice(o.choices)
    return o.value_type or (type(o.default) if isinstance(o.default, (int, float)) else str)


def _kind_flags() -> dict[str, Option]:
    """Every task kind's declared options by CLI flag (an option two kinds share is one flag)."""
    return {o.flag: o for k in KINDS for o in k.declared}


def _kind_param(o: Option) -> str:
    return "kind_" + o.name


def _kind_options(f: Callable) -> Callable:
    """`--kind` and one click option per task-kind option, type, choices and help from the declarations."""
    for flag, o in reversed(_kind_flags().items()):
        default = "" if o.default is None or "[default" in o.help else f" [default: {o.default}]"
        f = click.option(flag, _kind_param(o), type=_click_type(o), default=None, help=o.help + default)(f)
    return click.option("--kind", type=click.Choice(checkpoint_kinds()), default="fft", show_default=True,
                        help="how each task is kept: fft (a sparse delta, PERU-FFT), tall-mask (TALL mask over "
                             "θ*−θ0; build merges with --lambda 1 unless given), emr (EMR-Merging mask and "
                             "rescaler), bitdelta (sign bits and a scale per matrix), exact (bit for bit: XOR with "
                             "the base, compressed)")(f)


def _given_kind_options(flags: dict[str, Any]) -> dict[str, Any]:
    """The task-kind options given on the command line, by option name."""
    return {o.name: flags.pop(_kind_param(o)) for o in _kind_flags().values()
            if flags.get(_kind_param(o)) is not None}


def _merge_flags() -> dict[str, list[tuple[str, Option]]]:
    """Every merge method's declared options, grouped by CLI flag: flag -> [(method, option)]."""
    by_flag: dict[str, list[tuple[str, Option]]] = {}
    for m in METHODS:
        for o in m.declared:
            by_flag.setdefault(o.flag, []).append((m.name, o))
    return by_flag


def _param(flag: str) -> str:
    return "merge_" + flag.lstrip("-").replace("-", "_")


def _merge_options(f: Callable) -> Callable:
    """One click option per merge-method flag, its type, choices and defaults taken from the declarations."""
    for flag, uses in reversed(_merge_flags().items()):
        o = uses[0][1]
        kind = click.Choice(o.choices) if o.choices else (float if isinstance(o.default, float) else str)
        defaults = ", ".join(f"{m}: {u.default}" for m, u in uses)
        f = click.option(flag, _param(flag), type=kind, default=None, help=f"{o.help} [{defaults}]")(f)
    return f


def _given(ctx: click.Context, param: str) -> bool:
    return ctx.get_parameter_source(param) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


_base_codec_option = click.option(
    "--base-codec", type=click.Choice(list(BASE_CODECS)), default="lz4", show_default=True,
    help="how the base is written: lz4 is 12-25% smaller, none loads faster (read straight into the output)")


@main.command()
@click.argument("store")
@click.option("--config", "config_path", default=None, metavar="YAML",
              help="the build's settings as YAML (keys as these flags); flags given as well override it")
@click.option("--pretrained", default=None, help="pre-trained model: HF directory, .safetensors or .bin/.pt")
@click.option("--task", "tasks", multiple=True, metavar="NAME=PATH", help="a fully fine-tuned task model (repeat)")
@click.option("--merge", type=click.Choice(method_names()), default=None,
              help="how the shared base θ* is made; 'none' is Post-Pruning (θ* = θ0) [default: emr for "
                   "--kind emr, else task-arithmetic]")
@_merge_options
@click.option("--stats", "stats", multiple=True, metavar="TASK=PATH",
              help="fisher/regmean: the task's statistics file from modelstore.merging.statistics (repeat per task)")
@_kind_options
@click.option("--include", default=None, metavar="REGEX",
              help="only tensors whose name matches are merged and sparsified")
@click.option("--exclude", default=None, metavar="REGEX", help="tensors whose name matches are stored dense per task")
@click.option("--calibration", "calibration", multiple=True, metavar="NAME=FILE",
              help="task NAME's own inputs (JSON lines or CSV, as add-task --calibration reads them): it is kept at "
                   "the fewest bytes whose predictions agree with its original's on them (repeat per task)")
@_fidelity_options
@_base_codec_option
@_json_option
@click.pass_context
def build(ctx: click.Context, store: str, config_path: str | None, pretrained: str | None, tasks: tuple[str, ...],
          merge: str | None, stats: tuple[str, ...], kind: str, include: str | None, exclude: str | None,
          calibration: tuple[str, ...], base_codec: str, as_json: bool, **merge_flags: Any) -> None:
    """Build a new STORE from a pre-trained model and fully fine-tuned tasks (PERU-FFT by default).

    The merge method makes the shared base; docs/merging.md describes each one's options.
    """
    cfg = load_config(config_path) if config_path else BuildConfig()
    if merge is not None and merge != cfg.merge:
        cfg.merge, cfg.merge_options = merge, {}
    for name, value in {"pretrained": pretrained, "kind": kind, "include": include, "exclude": exclude,
                        "base_codec": base_codec}.items():
        if config_path is None or _given(ctx, name):
            setattr(cfg, name, value)
    flags = _fidelity(merge_flags)
    if {"min_agreement", "max_kl"} & set(flags):  # a target flag replaces the file's target, whichever it is
        cfg.fidelity.pop("min_agreement", None)
        cfg.fidelity.pop("max_kl", None)
    cfg.fidelity.update(flags)
    cfg.kind_options.update(_given_kind_options(merge_flags))  # what is left are the merge flags
    cfg.tasks.update(_pairs(tasks, "--task"))
    cfg.stats.update(_pairs(stats, "--stats"))
    cfg.calibration.update(_pairs(calibration, "--calibration"))
    if not cfg.tasks:
        raise InputError("build needs at least one --task NAME=PATH; use `modelstore init` for a base-only store")
    cfg.merge = cfg.merge or checkpoint_kind(cfg.kind).default_merge or "task-arithmetic"
    declared = {o.flag: o for o in method_class(cfg.merge).declared}
    for flag in _merge_flags():
        value = merge_flags[_param(flag)]
        if value is not None:
            if flag not in declared:
                raise InputError(f"{flag} does not apply to --merge {cfg.merge}")
            cfg.merge_options[declared[flag].name] = value
    s = build_store(store, **cfg.build_kwargs(), storage_options=_storage_options(ctx),
                    progress=_progress(ctx, as_json))
    info = s.info()
    _report(ctx, as_json, lambda: {"store": store, "generation": info["generation"], "bytes": info["bytes"],
                                   "base_bytes": info["base_bytes"], "ratio": info["ratio"],
                                   "tasks": [_written(s, t) for t in info["tasks"]]},
            f"built {store}: {len(info['tasks'])} tasks, {human_bytes(info['bytes'])} on disk "
            f"({percent(info['ratio'])} of the full checkpoints)")


@main.command()
@click.argument("store")
@click.option("--pretrained", required=True, help="pre-trained model: HF directory, .safetensors or .bin/.pt")
@_base_codec_option
@_json_option
@click.pass_context
def init(ctx: click.Context, store: str, pretrained: str, base_codec: str, as_json: bool) -> None:
    """Create a STORE holding only the pre-trained model (tasks are added later)."""
    s = init_store(store, pretrained, base_codec=base_codec, storage_options=_storage_options(ctx),
                   progress=_progress(ctx, as_json))
    info = s.info()
    _report(ctx, as_json, lambda: {"store": store, "generation": info["generation"], "bases": list(info["bases"]),
                                   "bytes": info["bytes"]}, f"created {store} ({human_bytes(info['bytes'])})")


@main.command("add-task")
@click.argument("store")
@click.argument("name")
@click.argument("path", required=False)
@_kind_options
@click.option("--base", type=click.Choice(["merged", "pretrained"]), default=None,
              help="base the delta is taken against [default: merged if the store has one]")
@click.option("--lora", "lora", default=None, metavar="ADAPTER_DIR",
              help="add a PEFT LoRA adapter (PERU-LoRA) instead of a full model PATH")
@click.option("--rank", type=int, default=None, help="LoRA: keep rank q of each update [default: 16]")
@click.option("--energy", type=float, default=None,
              help="LoRA: per module, the smallest q keeping this fraction of the squared Frobenius norm")
@click.option("--pretrained", default=None,
              help="LoRA, tall-mask, emr: the pre-trained model, needed once if the store keeps no θ0 (built "
                   "with a merge)")
@click.option("--overwrite", is_flag=True, help="replace an existing task of that name")
@click.option("--calibration", default=None, metavar="FILE",
              help="the task's own inputs (JSON lines or CSV: a text field, with text_pair for pairs; question and "
                   "context for QA; an image path for image models (with a text: a LLaVA's prompt), an audio path "
                   "(WAV) for speech models; labels not needed): keep the cheapest "
                   "representation whose predictions agree with the original's on them")
@_fidelity_options
@_json_option
@click.pass_context
def add_task(ctx: click.Context, store: str, name: str, path: str | None, kind: str, base: str | None,
             lora: str | None, rank: int | None, energy: float | None, pretrained: str | None, overwrite: bool,
             calibration: str | None, as_json: bool, **flags: Any) -> None:
    """Add the fine-tuned model at PATH (or --lora ADAPTER_DIR) to STORE as task NAME.

    The base and the other tasks are not rewritten.
    """
    if (path is None) == (lora is None):
        raise InputError("give either a fine-tuned model PATH or --lora ADAPTER_DIR")
    so = _storage_options(ctx)
    fidelity = _fidelity(flags)
    if fidelity and calibration is None:
        raise InputError(f"--{next(iter(fidelity)).replace('_', '-')} applies with --calibration FILE")
    options = _given_kind_options(flags)
    if lora is not None:
        if options or _given(ctx, "kind"):
            raise InputError(f"{'--kind' if _given(ctx, 'kind') else '--' + next(iter(options)).replace('_', '-')} "
                             "applies to full fine-tuned models, not --lora adapters")
        s = add_lora(store, name, lora, rank=rank, energy=energy, pretrained=pretrained, overwrite=overwrite,
                     storage_options=so, progress=_progress(ctx, as_json), calibration=calibration, **fidelity)
    else:
        assert path is not None  # one of path and lora, checked above
        if rank is not None or energy is not None:
            raise InputError("--rank and --energy apply to --lora tasks")
        chosen = kind if calibration is None or _given(ctx, "kind") else None
        s = add_fft(store, name, path, kind=chosen, base=base, pretrained=pretrained, overwrite=overwrite,
                    storage_options=so, progress=_progress(ctx, as_json), calibration=calibration, **fidelity,
                    **options)
    _report(ctx, as_json, lambda: {**_written(s, name), "generation": s.info()["generation"]},
            f"added {name}: {s.kind(name).describe(s.info(name))}")


def _row(name: str, e: dict[str, Any]) -> dict[str, Any]:
    setting = get_kind(e["kind"]).setting(cast(TaskEntry, e))  # info(task): the task's entry, name and ratio
    return {"task": name, "kind": e["kind"], "method": e["method"], "base": e["base"], "keep": None, "q": None,
            **setting, "setting": "/".join(str(v) for v in setting.values()),
            "kept": e.get("kept"), "bytes": e["bytes"], "full_bytes": e.get("full_bytes"), "ratio": e.get("ratio"),
            "fidelity": e.get("fidelity")}


def _setting_words(setting: dict[str, Any]) -> str:
    """A fidelity record's setting as words: `fft dare int4 keep 2% q 0.03`, `exact`."""
    words = [setting["kind"], setting.get("sparsify"), setting.get("value_dtype")]
    if setting.get("keep") is not None:
        words.append(f"keep {100 * setting['keep']:g}%")
    if setting.get("dare_q") is not None:
        words.append(f"q {setting['dare_q']:g}")
    if setting.get("rank") is not None:
        words.append(f"rank {setting['rank']}")
    return " ".join(str(w) for w in words if w is not None)


def _fidelity_line(f: FidelityRecord) -> str:
    """One line: what the stored task measured on the calibration data, against which target, and
    what the search chose (spec section 2, "Fidelity record")."""
    def against(metric: str, op: str, *more: str) -> str:
        of = "target of the 95% bound" if f.get("bound") else "target"
        said = [f"{of} {op} {f['target']:g}, {'met' if f['met'] else 'NOT met'}"] if f["metric"] == metric else []
        said += [m for m in more if m]
        return f" ({'; '.join(said)})" if said else ""

    on = f"{f['examples']} calibration examples"
    if "file_rows" in f:
        on += f" of the {f['file_rows']} rows of its file"
    if f["predictions"] != f["examples"]:
        on += f" ({f['predictions']} predictions)"
    chose = "tuned DARE's rescale, chose" if f["metric"] == "dare-q" else "chose"
    low = f"95% lower bound {f['agreement_low']:.4g}" if "agreement_low" in f else ""
    if f["setting"].get("kind") in {k.name for k in KINDS if k.lossless} and f.get("agreement_low") == 1:
        low = "bit for bit: agrees on any data"
    return (f"agreement {f['agreement']:.4g}{against('agreement', '>=', low)} on {on}, "
            f"mean KL {f['mean_kl']:.2g}{against('kl', '<=')}; {chose} {_setting_words(f['setting'])} "
            f"of {len(f['candidates'])} candidates")


@main.command("ls")
@click.argument("store")
@_json_option
@click.pass_context
def ls(ctx: click.Context, store: str, as_json: bool) -> None:
    """List the tasks of STORE."""
    s = _open(ctx, store)
    rows = [_row(t, s.info(t)) for t in s.tasks()]
    if as_json:
        _emit(rows)
        return
    click.echo(f"{'task':24} {'method':14} {'setting':>22} {'kept':>12} {'bytes':>10} {'ratio':>7} {'agree':>7}")
    for r in rows:
        agree = f"{r['fidelity']['agreement']:.4f}" if r["fidelity"] else "-"
        click.echo(f"{r['task']:24} {r['method']:14} {r['setting'] or '-':>22} "
                   f"{r['kept'] if r['kept'] is not None else '-':>12} {human_bytes(r['bytes']):>10} "
                   f"{percent(r['ratio']):>7} {agree:>7}")


@main.command()
@click.argument("store")
@click.argument("task", required=False)
@_json_option
@click.pass_context
def info(ctx: click.Context, store: str, task: str | None, as_json: bool) -> None:
    """Show STORE (or one TASK of it): method, parameters, kept entries, bytes on disk."""
    s = _open(ctx, store)
    data = s.info(task)
    if as_json:
        _emit({"fidelity": None, **data} if task is not None else data)  # null where not calibrated, as `ls` has it
        return
    if task is None:
        click.echo(f"store {store} (format v{data['format_version']}, generation {data['generation']}): "
                   f"{len(data['tasks'])} tasks; {data['writers']}")
        for b, e in data["bases"].items():
            raw = ", uncompressed" if e.get("codec") == "none" else ""
            click.echo(f"  base {b}: {e['merge'].get('method')} {e['merge']}, {human_bytes(e['bytes'])}{raw}")
        click.echo(f"  tasks: {human_bytes(data['task_bytes'])}; total {human_bytes(data['bytes'])} against "
                   f"{human_bytes(data['full_bytes'])} of full checkpoints ({percent(data['ratio'])})")
        return
    click.echo(f"task {task}: {data['method']} on the {data['base']} base")
    for k, v in data["params"].items():
        click.echo(f"  {k}: {v}")
    kind = s.kind(task)
    if data.get("total"):
        click.echo(f"  {kind.kept_label}: {data['kept']} of {data['total']} "
                   f"({100 * data['kept'] / data['total']:.2f}%)")
    of = kind.original_label
    click.echo(f"  bytes on disk: {human_bytes(data['bytes'])} "
               f"({percent(data['ratio'])} of {of}, {human_bytes(data['full_bytes'])})")
    click.echo(f"  source: {data['source']['path']} ({data['source']['fingerprint'][:19]}...)")
    if "fidelity" in data:
        click.echo(f"  fidelity: {_fidelity_line(data['fidelity'])}")


@main.command()
@click.argument("store")
@_json_option
@click.pass_context
def check(ctx: click.Context, store: str, as_json: bool) -> None:
    """Read every base and task of STORE back and verify it (no originals needed); exit 3 on damage."""
    report = _open(ctx, store).check()
    if as_json:
        _emit(report.as_dict())
    else:
        for what in report.sound:
            click.echo(f"ok       {what}")
        for what, why in report.damaged.items():
            click.echo(f"DAMAGED  {what}: {why}")
        click.echo(f"{len(report.sound)} sound, {len(report.damaged)} damaged")
    if not report.ok:
        sys.exit(EXIT_FOUND)


@main.command()
@click.argument("store")
@click.option("--grace", default="1h", show_default=True, metavar="DURATION",
              help="keep unreferenced payloads younger than this (30m, 1h, 2d): they may be in flight; "
                   "under 10m needs --force")
@click.option("--force", is_flag=True, help="allow a --grace under 10 minutes")
@click.option("--dry-run", is_flag=True, help="say what would be removed; delete nothing")
@_json_option
@click.pass_context
def gc(ctx: click.Context, store: str, grace: str, force: bool, dry_run: bool, as_json: bool) -> None:
    """Remove payload directories of STORE that no manifest entry references (left by killed writers),
    unless a writer at work holds a lease on them, and killed writers' leftovers."""
    s = open_store(store, mode="r" if dry_run else "a", storage_options=_storage_options(ctx))
    report = s.collect_garbage(grace, dry_run=dry_run, force=force)
    if as_json:
        _emit(report.as_dict())
        return
    if ctx.obj.get("quiet"):
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(report.removed)} unreferenced payload(s), {human_bytes(report.bytes_freed)}"
               + (f", {len(report.leftovers)} leftover(s)" if report.leftovers else "")
               + (f"; kept {len(report.kept_young)} younger than {grace}" if report.kept_young else "")
               + (f"; kept {len(report.kept_leased)} leased by writers at work" if report.kept_leased else ""))
    for rel in report.removed + report.leftovers:
        click.echo(f"  {rel}")


@main.command("rm")
@click.argument("store")
@click.argument("task")
@_json_option
@click.pass_context
def rm(ctx: click.Context, store: str, task: str, as_json: bool) -> None:
    """Remove TASK from STORE."""
    s = open_store(store, mode="a", storage_options=_storage_options(ctx))
    s.remove(task)
    _report(ctx, as_json, lambda: {"task": task, "removed": True, "generation": s.info()["generation"]},
            f"removed {task}")


@main.command()
@click.argument("store")
@click.argument("task")
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="hf", show_default=True,
              help="hf: full weights as model.safetensors + config.json; "
                   + "; ".join(f"{f}: {what}, for {k.name} tasks"
                               for k in KINDS for f, what in k.export_formats.items()))
@click.option("--dtype", default=None, help="cast floating tensors (float16, bfloat16, float32); default: as stored")
@click.option("--max-shard-size", default=MAX_SHARD_SIZE, show_default=True,
              help="largest safetensors file before the weights are sharded, as save_pretrained does")
@_json_option
@click.pass_context
def export(ctx: click.Context, store: str, task: str, out: str, fmt: str, dtype: str | None,
           max_shard_size: str, as_json: bool) -> None:
    """Write TASK of STORE to directory OUT (from_pretrained / PeftModel.from_pretrained load it)."""
    files = export_task(_open(ctx, store), task, out, fmt, dtype=dtype, max_shard_size=max_shard_size)
    _report(ctx, as_json, lambda: {"task": task, "out": out, "format": fmt, "files": list(files)},
            f"wrote {', '.join(files)} to {out}")


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--task", "tasks", multiple=True, metavar="NAME", help="copy only this task and its base (repeat)")
@click.option("--delete", is_flag=True, help="also remove DST's tasks that SRC lacks (a mirror)")
@click.option("--dry-run", is_flag=True, help="say what would be copied; write nothing")
@click.option("--dst-option", "dst_option", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for DST only (default: the -o options, which SRC always uses)")
@_json_option
@click.pass_context
def sync(ctx: click.Context, src: str, dst: str, tasks: tuple[str, ...], delete: bool, dry_run: bool,
         dst_option: tuple[str, ...], as_json: bool) -> None:
    """Copy the tasks of store SRC (and the bases they sit on) to DST, creating it if needed.

    SRC and DST are any locations a store can live at: a local path, s3://bucket/prefix,
    memory://name, hf://... Tasks already at DST with the same content are skipped. Each task
    is committed at DST once all its files are there, so an interrupted sync leaves every
    finished task readable and no partial one."""
    src_opts = _storage_options(ctx)
    dst_opts = {**(src_opts or {}), **_json_pairs(dst_option, "--dst-option")} or None
    sync_to = partial(run_sync, src, dst, tasks=list(tasks) or None, delete=delete, src_options=src_opts,
                      dst_options=dst_opts)
    plan = sync_to(dry_run=True)  # the bar's length
    if not dry_run:
        total = plan.bytes_to_copy
        with counter(total, f"sync to {dst}", enabled=_progress(ctx, as_json) and total > 0) as advance:
            plan = sync_to(on_bytes=advance)
    if as_json:
        _emit(plan.as_dict())
        return
    verb = "would copy" if dry_run else "copied"
    click.echo(f"{verb} {len(plan.copied)} task(s){': ' + ', '.join(plan.copied) if plan.copied else ''}"
               + (f" and base(s) {', '.join(plan.bases_copied)}" if plan.bases_copied else "")
               + ("" if dry_run else f" ({human_bytes(plan.bytes_copied)})"))
    if plan.up_to_date:
        click.echo(f"up to date: {', '.join(plan.up_to_date)}")
    if plan.deleted:
        click.echo(f"{'would delete' if dry_run else 'deleted'}: {', '.join(plan.deleted)}")


@main.command("eval")
@click.argument("store")
@click.argument("task")
@click.option("--original", default=None, help="the task's original: a transformers model directory")
@click.option("--lora", default=None, metavar="ADAPTER_DIR",
              help="instead, a LoRA task's PEFT adapter: the original is the model it makes of the store's θ0")
@click.option("--data", required=True,
              help='JSON lines: {"text": ...} with an optional "text_pair" and "label" (an extractive QA model\'s: '
                   '"question" and "context"; an image model\'s: "image", a speech model\'s: "audio" (WAV), a path), '
                   'or CSV with those columns')
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=None,
              help="tokens per example, cut (fewer where the model has fewer positions; a QA context is read in "
                   "windows) [default: as the task was calibrated, else 256]")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="exit with status 3 when the stored task's top-1 agreement with the original is below this")
@_json_option
@click.pass_context
def eval_task(ctx: click.Context, store: str, task: str, original: str | None, lora: str | None, data: str,
              batch_size: int, max_length: int | None, min_agreement: float | None, as_json: bool) -> None:
    """Run TASK from STORE and its original on DATA: accuracy (with labels), agreement and KL for a
    sequence classifier (per label for a multi-label one; a regression head's outputs' differences);
    top-1 agreement and KL per token for a token classifier, per masked token for a masked LM (and
    both models' accuracy at them), per answer start and end for an extractive QA model; perplexity,
    top-1 next-token agreement and KL for a causal LM; top-1 agreement and KL on the original's
    greedy output, and how often the task generates that output, for an encoder-decoder LM."""
    r = evaluate(_open(ctx, store), task, original, data, lora=lora, batch_size=batch_size, max_length=max_length,
                 progress=_progress(ctx, as_json))
    agreement = r.get("agreement", r.get("top1_agreement"))
    if min_agreement is not None:
        if agreement is None:
            raise InputError(f"--min-agreement: {task}'s original is a regression head, whose outputs have no "
                             "agreement; leave the option out and read mean_abs_difference")
        r["min_agreement"], r["ok"] = min_agreement, agreement >= min_agreement
    if as_json:
        _emit(r)
    else:
        click.echo(f"task {task}: {_eval_line(r)}")
    if min_agreement is not None and not r["ok"]:
        if not as_json:
            click.echo(f"FAILED: agreement below --min-agreement {min_agreement}")
        sys.exit(EXIT_FOUND)


#: eval's line's words for the fraction of texts whose predictions all agree (evaluation.outputs).
_WHOLE_WORDS = {"same_generation": "the same output", "same_answer": "the same answer",
                "same_labels": "the same labels", "same_transcript": "the same transcript"}
#: What eval's examples are called, by the data's modality.
_UNITS = {"text": "texts", "image": "images", "audio": "sounds", "image-text": "images with texts"}


def _eval_line(r: dict[str, Any]) -> str:
    """What `modelstore eval` prints of its result `r`."""
    kind = r["kind"]
    if kind == "regression":
        return (f"outputs differ from the original's by {r['mean_abs_difference']:.3g} on average (at most "
                f"{r['max_abs_difference']:.3g}; the original's spread {r['original_std']:.3g}) over "
                f"{r['examples']} examples")
    if kind == "causal-lm":
        return (f"perplexity {r['perplexity_stored']:.4g} (original {r['perplexity_original']:.4g}), top-1 agreement "
                f"{r['top1_agreement']:.2%}, mean KL {r['mean_kl']:.3g} over {r['tokens']} tokens")
    units = _UNITS.get(r.get("inputs", "text"), "examples")
    if kind == "embedding":
        return (f"the same nearest neighbour for {r['top1_agreement']:.2%} of {r['examples']} {units} (mean KL "
                f"{r['mean_kl']:.3g}); cosine to the original's embeddings {r['mean_cosine']:.4f} on average, "
                f"{r['min_cosine']:.4f} at the lowest")
    if kind == "zero-shot":
        return (f"the same text for {r['top1_agreement']:.2%} of {r['examples']} images among the data's {r['texts']} "
                f"texts (mean KL {r['mean_kl']:.3g}); matched with their own row's text {r['matched_stored']:.2%} "
                f"(original {r['matched_original']:.2%})")
    if kind in ("classification", "multiple-choice"):
        acc = (f"accuracy {r['accuracy_stored']:.2%} (original {r['accuracy_original']:.2%}, "
               f"{100 * r['accuracy_difference']:+.1f} points), " if "accuracy_stored" in r else "")
        return f"{acc}agreement {r['agreement']:.2%}, mean KL {r['mean_kl']:.3g} over {r['examples']} examples"
    what = {"seq2seq": "generated tokens", "masked-lm": "masked tokens", "question-answering": "answer starts and ends",
            "multi-label": "labels", "ctc": "frames", "frame-classification": "frames",
            "segmentation": "pixels"}.get(kind, "tokens")
    extra = "".join(f", {words} for {r[k]:.2%} of {units}" for k, words in _WHOLE_WORDS.items() if k in r)
    if "accuracy_stored" in r:
        extra += f", accuracy at them {r['accuracy_stored']:.2%} (original {r['accuracy_original']:.2%})"
    if "exact_match_stored" in r:
        extra += f", every label right {r['exact_match_stored']:.2%} (original {r['exact_match_original']:.2%})"
    return (f"top-1 agreement {r['top1_agreement']:.2%}, mean KL {r['mean_kl']:.3g} over {r['predictions']} {what} "
            f"of {r['examples']} {units}{extra}")


@main.command()
@click.argument("store")
@click.argument("task")
@click.option("--original", default=None, help="the task's original checkpoint (for a LoRA task: merged)")
@click.option("--lora", default=None, metavar="ADAPTER_DIR", help="a LoRA task's original PEFT adapter")
@click.option("--max-rel-error", type=float, default=0.05, show_default=True,
              help="exit with status 3 when the overall relative error is above this")
@_json_option
@click.pass_context
def verify(ctx: click.Context, store: str, task: str, original: str | None, lora: str | None, max_rel_error: float,
           as_json: bool) -> None:
    """Compare TASK's stored weights with its original (relative Frobenius error).

    Weight-space error does not predict a task's accuracy: a task within --max-rel-error may
    still answer differently; `modelstore eval` measures its outputs against the original's."""
    r = run_verify(_open(ctx, store), task, original, lora)
    r["max_rel_error"] = max_rel_error
    r["ok"] = r["rel_error"] <= max_rel_error
    if as_json:
        _emit(r)
    else:
        worst = r["worst_tensor"]
        click.echo(f"task {task}: relative error {r['rel_error']:.3e} overall, worst tensor {worst} "
                   f"{r['tensors'][worst]:.3e}; kept fraction {r['kept_fraction']:.4f}")
        click.echo("OK" if r["ok"] else f"FAILED: above --max-rel-error {max_rel_error}")
        click.echo("(weight-space error does not predict accuracy; `modelstore eval` measures outputs)")
    if not r["ok"]:
        sys.exit(EXIT_FOUND)
