"""The ``grnx`` command: run, validate and show recipes, list plugins, inspect and clear the cache,
open the MLflow UI.

User errors (bad recipes, missing files, bad data) exit with status 2 and a short message; a
traceback is printed only with ``--debug``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

from grnx_core import __version__
from grnx_core.components import Kind
from grnx_core.errors import GrnxError, RecipeError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


def _split_recipes_and_overrides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The positional recipe paths and the overrides: ``KEY=VALUE`` positionals, then ``--set``s.

    An argument with ``=`` is an override unless a file or folder of that name exists, so
    ``grnx run r.yaml seed=1``, ``grnx validate r.yaml seed=1`` and ``--set seed=1`` all agree.
    """
    recipes, overrides = [], []
    for item in args.items:
        if "=" in item and not Path(item).exists():
            overrides.append(item)
        else:
            recipes.append(item)
    return recipes, overrides + list(args.set_overrides)


def _one_recipe(args: argparse.Namespace) -> tuple[str, list[str]]:
    recipes, overrides = _split_recipes_and_overrides(args)
    if len(recipes) != 1:
        found = f"got {len(recipes)}: {', '.join(recipes)}" if recipes else "got none"
        raise GrnxError(
            f"grnx {args.command} takes one recipe file, {found}. Overrides are KEY=VALUE (e.g. seed=1); "
            "check the recipe's path."
        )
    return recipes[0], overrides


def _recipe_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


# -- commands -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from grnx_core.cache import Cache
    from grnx_core.processes import is_main_process, n_processes
    from grnx_core.recipe import load_recipe
    from grnx_core.runner import run_recipe

    recipe, overrides = _one_recipe(args)
    if args.ray_address:  # the same as the override, so chunked work of a plain run goes there too
        overrides = [*overrides, f"execution.ray_address={args.ray_address}"]
    resolved = load_recipe(recipe, overrides)
    # Under torchrun / accelerate launch every process runs the recipe (the model trains
    # data-parallel); only the main one stores cache entries, tracks the run and prints.
    main = is_main_process()
    cache = Cache(enabled=resolved.recipe.cache and not args.no_cache, read_only=not main)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        if resolved.recipe.tune is not None:
            if n_processes() > 1:
                raise GrnxError(
                    f"recipe {resolved.recipe.name!r} has a tune block, which runs its trials on Ray, "
                    f"not under torchrun / accelerate launch ({n_processes()} processes). Run it with "
                    "plain `grnx run`, or drop the tune block to train one model data-parallel."
                )
            return _run_tune(resolved, cache, args)
        result = run_recipe(
            resolved,
            tracking_uri=args.tracking_uri,
            track=not args.no_track and main,
            cache=cache,
            show_progress=main,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if main:
        _print_summary(resolved, result, args)
    return 0


def _run_tune(resolved: Any, cache: Any, args: argparse.Namespace) -> int:
    """`grnx run` on a recipe with a tune block: the tune, then a line per trial."""
    from grnx_core.tuning import describe_settings, run_tune

    result = run_tune(
        resolved,
        tracking_uri=args.tracking_uri,
        track=not args.no_track,
        cache=cache,
        ray_address=args.ray_address,
        show_progress=True,
    )
    spec = resolved.recipe.tune
    resumed = " (resumed)" if result.resumed else ""
    print(f"tune {result.run_id or '(not tracked)'}: {result.status}{resumed}, {len(result.trials)} trials")
    for trial in result.trials:
        value = f"{trial.value:.4g}" if trial.value is not None else trial.status
        mark = " *" if result.best is not None and trial.number == result.best.number else ""
        print(f"  trial {trial.number:>3}  {spec.metric} {value}  {describe_settings(trial.settings)}{mark}")
    if result.best is not None:
        print(f"  best: trial {result.best.number} ({spec.metric} {result.best.value:.4g})")
    held_out = result.metrics.get(f"tune/held_out/{spec.metric}")
    if held_out is not None:
        print(f"  best trial on the held-out ground truth: {spec.metric} {held_out:.4g}")
    if result.run_id:
        print(f"  view: {_run_page(result.run_id, args.tracking_uri)}")
    return 0


def _print_summary(resolved: Any, result: Any, args: argparse.Namespace) -> None:
    """The compact end-of-run summary; ``--verbose`` adds every metric and the top pairs."""
    from grnx_core.summary import headline_table, stage_line

    recipe = resolved.recipe
    nested = f", {len(result.children)} child runs" if result.children else ""
    print(
        f"run {result.run_id or '(not tracked)'}: {result.status} ({recipe.name} v{recipe.version}{nested})"
    )
    for line in headline_table(result.metrics, list(result.interactions)):
        print(f"  {line}")
    print(f"  {stage_line(result.stages)}")
    if args.verbose and result.metrics:
        width = max(len(name) for name in result.metrics)
        for name in sorted(result.metrics):
            print(f"  {name:<{width}}  {result.metrics[name]:.6g}")
    if args.verbose:
        for step_id, interactions in result.interactions.items():
            top = interactions.table.head(5)
            pairs = ", ".join(f"{s}-{t}" for s, t in zip(top["source"], top["target"]))
            print(f"  {step_id}: {len(interactions)} pairs; top: {pairs}")
    if result.run_id:
        if result.artifact_uri:
            print(f"  artifacts: {result.artifact_uri}")
        print(f"  view: {_run_page(result.run_id, args.tracking_uri)}")
    if not args.verbose:
        print("  (--verbose lists every metric)")


def _run_page(run_id: str, tracking_uri: str | None) -> str:
    """Where the UI shows the run, once `grnx ui` (with the same store) serves it."""
    from grnx_core.tracking import Tracker, run_url

    start = "grnx ui" + (f" --tracking-uri {tracking_uri}" if tracking_uri else "")
    try:
        experiment_id = Tracker(tracking_uri).experiment_id_of_run(run_id)
    except Exception as error:  # the run is tracked and finished; a failed look-up must not fail it
        return f"{start}, then find run {run_id} (its experiment could not be read: {error})"
    return f"{run_url(experiment_id, run_id)} (start the UI with {start})"


def cmd_compare(args: argparse.Namespace) -> int:
    """``grnx compare EXPERIMENT``: its runs, children under their parents, side by side."""
    from grnx_core.compare import compare_table, format_table
    from grnx_core.tracking import Tracker

    table = compare_table(Tracker(args.tracking_uri), args.experiment, args.metric)
    print(format_table(table))
    if args.csv:
        from grnx_core.atomic import atomic_path

        with atomic_path(Path(args.csv)) as target:
            table.to_csv(target, index=False)
        print(f"wrote {args.csv} ({len(table)} runs, {len(table.columns)} columns)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``grnx report EXPERIMENT``: markdown tables (mean, t-interval) and PNG figures of its runs."""
    import shlex

    from grnx_core.report import REPEAT_PARAMS, write_report
    from grnx_core.tracking import Tracker

    command = shlex.join(["grnx", "report", *_report_argv(args)])
    report = write_report(
        Tracker(args.tracking_uri),
        args.experiment,
        Path(args.out) if args.out else None,
        metrics=args.metric,
        x=args.x,
        repeat_params=tuple(args.repeat_param) if args.repeat_param else REPEAT_PARAMS,
        confidence=args.confidence,
        command=command,
    )
    print(f"wrote {report.path} ({len(report.tables)} tables, {len(report.figures)} figures)")
    return 0


def _report_argv(args: argparse.Namespace) -> list[str]:
    """The report's own arguments, to print the command that made it at its top."""
    items = [args.experiment]
    if args.out:
        items += ["--out", args.out]
    for metric in args.metric or []:
        items += ["--metric", metric]
    if args.x:
        items += ["--x", args.x]
    for name in args.repeat_param or []:
        items += ["--repeat-param", name]
    if args.confidence != 0.95:
        items += ["--confidence", str(args.confidence)]
    if args.tracking_uri:
        items += ["--tracking-uri", args.tracking_uri]
    return items


def cmd_validate(args: argparse.Namespace) -> int:
    from grnx_core.recipe import load_recipe

    paths, overrides = _split_recipes_and_overrides(args)
    if not paths:
        raise GrnxError(
            "grnx validate needs a recipe file or a folder of recipes before its KEY=VALUE overrides."
        )
    files = _recipe_files(paths)
    if not files:
        raise GrnxError(f"no recipe files found in {', '.join(paths)} (looked for *.yaml / *.yml).")
    failures = 0
    for path in files:
        try:
            load_recipe(path, overrides)
        except RecipeError as error:
            failures += 1
            print(f"invalid: {path}\n{textwrap.indent(str(error), '  ')}", file=sys.stderr)
        else:
            print(f"ok: {path}")
    return EXIT_USER_ERROR if failures else 0


def cmd_show(args: argparse.Namespace) -> int:
    from grnx_core.recipe import load_recipe

    recipe, overrides = _one_recipe(args)
    print(load_recipe(recipe, overrides).to_yaml(), end="")
    return 0


def _type_name(annotation: Any) -> str:
    """``int``, ``list[str] | None``, ``Literal['abs', 'value']``: as one writes them."""
    import types
    import typing

    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(argument) for argument in arguments)}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(argument) for argument in arguments)
    if origin is not None and arguments:
        inner = ", ".join("..." if argument is Ellipsis else _type_name(argument) for argument in arguments)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if hasattr(annotation, "__name__"):
        return str(annotation.__name__)
    return str(annotation).replace("typing.", "").replace("pathlib.", "")


def _describe_fields(model: Any, indent: str = "      ", depth: int = 0) -> list[str]:
    """A line per field of a pydantic model; the fields of a nested model follow, indented."""
    from pydantic import BaseModel

    from grnx_core.recipe import _model_in

    lines = []
    # Required params first: inherited params (shared mixins) would otherwise lead the list.
    for name, info in sorted(model.model_fields.items(), key=lambda item: not item[1].is_required()):
        nested = _model_in(info.annotation)
        if info.is_required():
            default = "required"
        else:
            value = info.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                changed = value.model_dump(mode="json", exclude_defaults=True)
                default = f"default {changed}, other fields as below" if changed else "default: as below"
            else:
                default = f"default {value!r}"
        line = f"{indent}{name} ({_type_name(info.annotation)}, {default})"
        lines.append(f"{line}: {info.description}" if info.description else line)
        if nested is not None and depth < 3:
            lines.extend(_describe_fields(nested, indent + "    ", depth + 1))
    return lines


def _describe_params(cls: Any) -> list[str]:
    return _describe_fields(cls.Params)


#: What `grnx plugins KIND` accepts for each kind: its name, its plural, and spellings of both.
def _kind_aliases() -> dict[str, Kind]:
    aliases: dict[str, Kind] = {}
    for kind in Kind:
        for alias in (kind.value, kind.value + "s", kind.plural):
            for spelling in (alias, alias.replace(" ", "_"), alias.replace(" ", "-")):
                aliases[spelling] = kind
    aliases.update({"data_source": Kind.DATA, "data-source": Kind.DATA})
    return aliases


def _plugins_to_show(
    registry: Any, kind_or_name: str | None, name: str | None
) -> list[tuple[Kind, list[str]]]:
    """(kind, names) to list for `grnx plugins [KIND] [NAME]`; KIND may be a plural, or a name alone."""
    import difflib

    if kind_or_name is None:
        return [(kind, registry.names(kind)) for kind in Kind]
    aliases = _kind_aliases()
    kind = aliases.get(kind_or_name.lower())
    if kind is not None:
        return [(kind, [registry.entry(kind, name).name] if name is not None else registry.names(kind))]
    kinds = ", ".join(k.value for k in Kind)
    if name is not None:
        close = difflib.get_close_matches(kind_or_name, list(aliases), n=1)
        suggestion = f" Did you mean {aliases[close[0]].value!r}?" if close else ""
        raise GrnxError(f"Unknown kind {kind_or_name!r}.{suggestion} Kinds: {kinds} (see `grnx plugins`).")
    found = [(k, [kind_or_name]) for k in Kind if kind_or_name in registry.entries[k]]
    if found:
        return found
    every = {n: k for k in Kind for n in registry.names(k)}
    close = difflib.get_close_matches(kind_or_name, [*every, *aliases], n=1)
    suggestion = ""
    if close and close[0] in every:
        suggestion = f" Did you mean {close[0]!r} ({every[close[0]].value})?"
    elif close:
        suggestion = f" Did you mean the kind {aliases[close[0]].value!r}?"
    raise GrnxError(
        f"No kind or component named {kind_or_name!r}.{suggestion} Kinds: {kinds}; `grnx plugins` lists "
        "every component."
    )


def cmd_plugins(args: argparse.Namespace) -> int:
    from grnx_core.registry import default_registry

    registry = default_registry()
    detailed = args.kind is not None
    for kind, names in _plugins_to_show(registry, args.kind, args.name):
        print(f"{kind.plural} ({len(names)}):")
        for name in names:
            entry = registry.entries[kind][name]
            try:
                cls = entry.load()
            except GrnxError as error:
                print(f"  {name}  [failed to load] {error}")
                continue
            print(f"  {name}: {cls.description}  [{entry.plugin} {entry.plugin_version}]")
            if detailed:
                if cls.reference:
                    print(f"    reference: {cls.reference}")
                params = _describe_params(cls)
                print("    params:" if params else "    params: none")
                for line in params:
                    print(line)
    problems = registry.problems()
    if problems:
        print("\nproblems:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
    return 0


#: Runs beside the MLflow server, in its process group: when grnx ends in any way, SIGKILL
#: included, it stops the whole group, so no server is left holding the port.
_UI_WATCHDOG = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
server = subprocess.Popen(sys.argv[2:])
while server.poll() is None and os.getppid() == parent:
    time.sleep(0.5)
code = server.poll()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.killpg(0, signal.SIGTERM)
deadline = time.monotonic() + 10
while server.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
if server.poll() is None:
    os.killpg(0, signal.SIGKILL)
sys.exit(code or 0)
"""


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _stop_process_group(process: Any, timeout_s: float = 5.0) -> None:
    """SIGTERM the process group led by ``process``; SIGKILL what is left of it after ``timeout_s``."""
    import os
    import time

    for signum in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + timeout_s
        try:
            os.killpg(process.pid, signum)
            while time.monotonic() < deadline:
                process.poll()  # reap the leader, or it counts as a member until grnx exits
                os.killpg(process.pid, 0)  # ProcessLookupError once no member is left
                time.sleep(0.1)
        except ProcessLookupError:
            process.poll()
            return
        except PermissionError:  # the group id was reused by another user's processes
            return


def cmd_ui(args: argparse.Namespace) -> int:
    import atexit
    import os
    import subprocess

    from grnx_core.tracking import Tracker, artifact_root_for, default_tracking_uri, experiment_url

    uri = args.tracking_uri or default_tracking_uri()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    artifact_root = artifact_root_for(uri)
    if artifact_root is not None:
        command += ["--default-artifact-root", artifact_root.resolve().as_uri()]
    wildcard = args.host in ("0.0.0.0", "::", "[::]", "")
    base = f"http://{'127.0.0.1' if wildcard else args.host}:{args.port}"
    if not _is_loopback(args.host):
        print(
            f"warning: the MLflow UI has no authentication. On --host {args.host} anyone who can reach "
            f"this machine on port {args.port} can read, change and delete every run in {uri}. Use the "
            "default --host 127.0.0.1 (and an SSH tunnel from elsewhere) unless that network is trusted.",
            file=sys.stderr,
        )
    print(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it.", file=sys.stderr)
    # Opened before the server starts, so a new store is created once, under grnx's lock.
    try:
        experiments, total = Tracker(uri).recent_experiments()
    except Exception as error:  # the server reports a store it cannot open itself
        print(f"(could not list the experiments of {uri}: {error})", file=sys.stderr)
    else:
        for experiment_id, name in experiments:
            print(f"  runs of {name!r}: {experiment_url(experiment_id, base)}", file=sys.stderr)
        if total > len(experiments):
            print(f"  ({total - len(experiments)} more experiments in the UI's list)", file=sys.stderr)
    # Its own session: stopping grnx stops the whole group (the server starts a dozen processes),
    # and the watchdog stops it when grnx is killed outright.
    process = subprocess.Popen(
        [sys.executable, "-c", _UI_WATCHDOG, str(os.getpid()), *command], start_new_session=True
    )
    atexit.register(_stop_process_group, process)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_process_group(process)
        atexit.unregister(_stop_process_group)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_cache(args: argparse.Namespace) -> int:
    import difflib
    from datetime import datetime, timezone

    from grnx_core.cache import Cache, format_duration, format_size, parse_duration

    cache_dir = getattr(args, "cache_dir", None)
    cache = Cache(Path(cache_dir).expanduser() if cache_dir else None)
    root = cache.root.absolute()
    now = datetime.now(timezone.utc)

    def when(moment: datetime) -> str:
        age = now - moment
        ago = "just now" if age.total_seconds() < 60 else f"{format_duration(age)} ago"
        return f"{moment.astimezone():%Y-%m-%d %H:%M} ({ago})"

    def entries(count: int) -> str:
        return f"{count} entr{'y' if count == 1 else 'ies'}"

    if args.cache_command == "info":
        summary = list(cache.info().values())
        print(f"cache: {root}")
        if not summary:
            print("no entries")
            return 0
        header = ("stage", "entries", "size", "last used", "least recently used")
        rows = [
            (s.stage, str(s.n_entries), format_size(s.n_bytes), when(s.newest_use), when(s.oldest_use))
            for s in summary
        ]
        rows.append(
            (
                "total",
                str(sum(s.n_entries for s in summary)),
                format_size(sum(s.n_bytes for s in summary)),
                when(max(s.newest_use for s in summary)),
                when(min(s.oldest_use for s in summary)),
            )
        )
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
        for row in [header, *rows]:
            # Counts and sizes right-aligned, so their magnitudes line up.
            cells = [
                cell.rjust(width) if column in (1, 2) else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(row, widths))
            ]
            print("  ".join(cells).rstrip())
        return 0

    older_than = None
    if args.older_than is not None:
        try:
            older_than = parse_duration(args.older_than)
        except GrnxError as error:
            raise GrnxError(f"--older-than: {error}") from None
    if args.stage is not None:
        stages = cache.stages()
        close = difflib.get_close_matches(args.stage, stages, n=1)
        if args.stage.replace(":", "_") not in stages and close:
            raise GrnxError(
                f"no stage {args.stage!r} in the cache at {root}. Did you mean {close[0]!r}? "
                f"Stages there: {', '.join(stages)}."
            )
    if not args.yes and not sys.stdin.isatty():
        raise GrnxError(
            "grnx cache clear asks before removing anything, but stdin is not a terminal; "
            "pass --yes to remove without asking."
        )
    scope = "".join(
        [
            f"of stage {args.stage} " if args.stage is not None else "",
            f"not used for {args.older_than} " if older_than is not None else "",
        ]
    )
    n_entries, n_bytes = cache.clear(older_than, args.stage, dry_run=True)
    if n_entries == 0:
        print(f"nothing to remove {scope}in {root}")
        return 0
    if not args.yes:
        try:
            answer = input(f"remove {entries(n_entries)} ({format_size(n_bytes)}) {scope}from {root}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing removed")
            return 0
    n_entries, n_bytes = cache.clear(older_than, args.stage)
    print(f"removed {entries(n_entries)} ({format_size(n_bytes)}) {scope}from {root}")
    return 0


def _run_tokens(tracker: Any, run_id: str) -> Path:
    """The token folder of run ``run_id`` (or of its child runs, when they share one)."""
    from mlflow.exceptions import MlflowException

    from grnx_core.engine import TOKENS_PATH_TAG

    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        raise GrnxError(
            f"no run {run_id!r} in the tracking store {tracker.tracking_uri}. `grnx ui` lists the runs; "
            "pass --tracking-uri for another store."
        ) from None
    path = run.data.tags.get(TOKENS_PATH_TAG)
    if path is None:
        children = tracker.client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"
        )
        shared: dict[str, list[str]] = {}
        for child in children:
            if TOKENS_PATH_TAG in child.data.tags:
                shared.setdefault(child.data.tags[TOKENS_PATH_TAG], []).append(child.info.run_id)
        if len(shared) > 1:
            listing = "; ".join(f"run {', '.join(ids[:3])}: {where}" for where, ids in shared.items())
            raise GrnxError(
                f"the child runs of run {run_id} have different tokens ({listing}); export one of them."
            )
        if not shared:
            raise GrnxError(
                f"run {run_id} kept no tokens: its recipe has no tokenizer, or it ran with the cache off "
                "(--no-cache or cache: false), so the tokens were thrown away. Rerun it with the cache on."
            )
        path = next(iter(shared))
    folder = Path(path)
    if not (folder / "meta.json").is_file():
        raise GrnxError(
            f"the tokens of run {run_id} were in {folder}, which no longer exists (removed by `grnx cache "
            "clear`?). Rerun the run's recipe with the cache on to compute them again."
        )
    return folder


def _run_interactions(tracker: Any, run_id: str, extractor: str | None) -> tuple[Any, Any]:
    """The MLflow run and the ``Interactions`` it logged (``interactions/<extractor>.parquet``)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from grnx_core.data_types import Interactions

    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        raise GrnxError(
            f"no run {run_id!r} in the tracking store {tracker.tracking_uri}. `grnx ui` lists the runs; "
            "pass --tracking-uri for another store."
        ) from None
    logged = {
        Path(item.path).stem: item.path
        for item in tracker.client.list_artifacts(run_id, "interactions")
        if item.path.endswith(".parquet")
    }
    if not logged:
        children = tracker.client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"
        )
        with_pairs = [
            child.info.run_id
            for child in children
            if tracker.client.list_artifacts(child.info.run_id, "interactions")
        ]
        if with_pairs:
            raise GrnxError(
                f"run {run_id} logged no interactions itself; its child runs did ({', '.join(with_pairs[:5])}"
                f"{', ...' if len(with_pairs) > 5 else ''}): export one of them."
            )
        raise GrnxError(
            f"run {run_id} logged no interactions: its recipe has no extractors, or it failed before "
            f"them (status {run.info.status})."
        )
    if extractor is None:
        if len(logged) > 1:
            raise GrnxError(
                f"run {run_id} has interactions from several extractors ({', '.join(sorted(logged))}); "
                "choose one with --extractor ID."
            )
        extractor = next(iter(logged))
    elif extractor not in logged:
        raise GrnxError(
            f"run {run_id} has no interactions from extractor {extractor!r}; it has "
            f"{', '.join(sorted(logged))}."
        )
    with tempfile.TemporaryDirectory() as scratch:
        local = tracker.client.download_artifacts(run_id, logged[extractor], scratch)
        return run, Interactions.load(Path(local))


def _export_interactions(args: argparse.Namespace) -> int:
    """``grnx export interactions RUN_ID OUT --format F``: a run's ranked pairs for another tool."""
    from grnx_core.exports import export_interactions
    from grnx_core.tracking import Tracker

    out = Path(args.out)
    if out.exists() and not args.force:
        raise GrnxError(f"{out} exists; pass --force to replace it, or name another OUT.")
    if args.top_k is not None and args.top_k < 1:
        raise GrnxError(f"--top-k must be at least 1, got {args.top_k}.")
    run, interactions = _run_interactions(Tracker(args.tracking_uri), args.run_id, args.extractor)
    dataset_id = args.dataset_id or run.data.tags.get("grnx.recipe") or run.info.run_name
    written = export_interactions(
        interactions,
        out,
        args.format,
        top_k=args.top_k,
        method_id=args.method_id,
        dataset_id=dataset_id,
    )
    kept = min(len(interactions), args.top_k) if args.top_k is not None else len(interactions)
    kind = "directed" if interactions.directed else "undirected"
    print(
        f"wrote {written} ({args.format} format): {kept} {kind} pairs from extractor "
        f"{interactions.extractor!r} of run {args.run_id}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``grnx export tokens RUN_ID OUT``: a run's tokens written in another format; ``grnx export
    interactions RUN_ID OUT``: its ranked pairs."""
    import json

    if args.export_what == "interactions":
        return _export_interactions(args)

    from grnx_core.registry import default_registry
    from grnx_core.tracking import Tracker

    folder = _run_tokens(Tracker(args.tracking_uri), args.run_id)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise GrnxError(f"{out} exists; pass --force to replace it, or name another OUT.")
    rename = {}
    for pair in args.rename:
        old, equals, new = pair.partition("=")
        if not equals or not old or not new:
            raise GrnxError(f"--rename takes OBS_COLUMN=DATASET_COLUMN, got {pair!r}.")
        rename[old] = new
    metadata = json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("metadata", {})
    name = metadata.get("tokenizer")
    tokenizer = default_registry().entry(Kind.TOKENIZER, str(name)).load()
    exporter = getattr(tokenizer, "export_tokens", None)
    if exporter is None:
        raise GrnxError(
            f"run {args.run_id} has tokens of tokenizer {name!r}, which cannot be exported as "
            f"{args.format} (rank_value's tokens can)."
        )
    written = exporter(folder, out, format=args.format, columns=args.columns, rename=rename)
    print(f"wrote {written} ({args.format} format) from the tokens of run {args.run_id} in {folder}")
    return 0


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # --debug works before or after the command; the command's copy must not reset the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    # run, show and validate read recipes and overrides alike: positional KEY=VALUE or --set.
    recipe_args = argparse.ArgumentParser(add_help=False)
    recipe_args.add_argument(
        "items",
        nargs="+",
        metavar="RECIPE",
        help="recipe YAML file (validate: files or folders), then overrides such as seed=1 "
        "model.params.n_layers=2",
    )
    recipe_args.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override, as a positional KEY=VALUE (repeatable)",
    )
    parser = argparse.ArgumentParser(
        prog="grnx",
        description="Gene-gene interactions from single-cell data, as tracked experiments.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"grnx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    one_recipe = "%(prog)s RECIPE [KEY=VALUE ...] [options]"
    run = commands.add_parser(
        "run", parents=[common, recipe_args], usage=one_recipe, help="run a recipe and track it in MLflow"
    )
    run.add_argument("--no-cache", action="store_true", help="recompute every step")
    run.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    run.add_argument("--verbose", "-v", action="store_true", help="print every metric and the top pairs")
    run.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlflow/mlflow.db)"
    )
    run.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="send a tune's trials, and a run's chunked work (grnboost2 targets, attention cell chunks), "
        "to an existing Ray cluster (e.g. 127.0.0.1:6379 or ray://head:10001); overrides execution.ray_address",
    )
    run.set_defaults(handler=cmd_run)

    compare = commands.add_parser(
        "compare", parents=[common], help="a table of an experiment's runs: differing params, key metrics"
    )
    compare.add_argument(
        "experiment", metavar="EXPERIMENT", help="MLflow experiment name (tracking.experiment)"
    )
    compare.add_argument(
        "--metric",
        action="append",
        default=None,
        metavar="NAME",
        help="a metric column, * matching any text (e.g. eval/*/macro_f1; repeatable); default: eval/ metrics",
    )
    compare.add_argument("--csv", default=None, metavar="FILE", help="also write the whole table to FILE")
    compare.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlflow/mlflow.db)"
    )
    compare.set_defaults(handler=cmd_compare)

    report = commands.add_parser(
        "report",
        parents=[common],
        help="a markdown report of an experiment: per metric, mean and 95%% interval per group, figures",
    )
    report.add_argument(
        "experiment", metavar="EXPERIMENT", help="MLflow experiment name (tracking.experiment)"
    )
    report.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="folder for report.md, figures/ and tables/, or a .md file (its figures and tables then go "
        "in the folder of the same name); default reports/<experiment>/",
    )
    report.add_argument(
        "--metric",
        action="append",
        default=None,
        metavar="NAME",
        help="an evaluator metric to tabulate, by its name (e.g. auprc, epr; * matches any text; "
        "repeatable); default: every metric with a direction",
    )
    report.add_argument(
        "--x",
        default=None,
        metavar="PATH",
        help="param on the figures' x axis (default: the swept fraction, else the numeric param with most values)",
    )
    report.add_argument(
        "--repeat-param",
        action="append",
        default=None,
        metavar="PATH",
        help="a param whose values are repeats of one setting, pooled in a group (default: sampler.seed; "
        "repeatable, e.g. --repeat-param seed for runs started with seed=0, seed=1, ...)",
    )
    report.add_argument(
        "--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)"
    )
    report.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlflow/mlflow.db)"
    )
    report.set_defaults(handler=cmd_report)

    validate = commands.add_parser(
        "validate",
        parents=[common, recipe_args],
        usage="%(prog)s RECIPE_OR_FOLDER [...] [KEY=VALUE ...] [options]",
        help="check recipes (files or folders) without running them",
    )
    validate.set_defaults(handler=cmd_validate)

    show = commands.add_parser(
        "show", parents=[common, recipe_args], usage=one_recipe, help="print the resolved recipe"
    )
    show.set_defaults(handler=cmd_show)

    plugins = commands.add_parser("plugins", parents=[common], help="list installed components")
    plugins.add_argument(
        "kind",
        nargs="?",
        metavar="KIND",
        help=f"only this kind, with params ({', '.join(k.value for k in Kind)}; plurals too), or a "
        "component's name alone",
    )
    plugins.add_argument("name", nargs="?", metavar="NAME", help="only this component")
    plugins.set_defaults(handler=cmd_plugins)

    ui = commands.add_parser("ui", parents=[common], help="open the MLflow UI on the grnx store")
    ui.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", default=None)
    ui.set_defaults(handler=cmd_ui)

    # --cache-dir is accepted before or after the action, like --debug.
    cache_dir = argparse.ArgumentParser(add_help=False)
    cache_dir.add_argument(
        "--cache-dir",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="cache folder (default: GRNX_CACHE_DIR or ~/.cache/grnx)",
    )
    cache = commands.add_parser(
        "cache", parents=[common, cache_dir], help="inspect or clear the cache of finished steps"
    )
    cache_actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    cache_actions.add_parser("info", parents=[common, cache_dir], help="entries, size and last use per stage")
    clear = cache_actions.add_parser(
        "clear", parents=[common, cache_dir], help="remove cache entries (asks first)"
    )
    clear.add_argument(
        "--older-than", metavar="AGE", default=None, help="only entries not used for AGE, e.g. 7d, 12h or 30m"
    )
    clear.add_argument("--stage", default=None, help="only entries of this stage, e.g. model or tokenize")
    clear.add_argument(
        "--yes", "-y", action="store_true", help="remove without asking (needed without a terminal)"
    )
    cache.set_defaults(handler=cmd_cache)

    export = commands.add_parser("export", parents=[common], help="write a run's outputs in other formats")
    export_what = export.add_subparsers(dest="export_what", required=True, metavar="WHAT")
    tokens = export_what.add_parser(
        "tokens",
        parents=[common],
        help="a run's tokens, e.g. as the Geneformer .dataset its classifier and perturber read",
    )
    tokens.add_argument(
        "run_id", metavar="RUN_ID", help="the run (or a parent run whose children share tokens)"
    )
    tokens.add_argument("out", metavar="OUT", help="folder to write, e.g. cells.dataset")
    tokens.add_argument(
        "--format",
        choices=["geneformer"],
        required=True,
        help="geneformer: Hugging Face datasets folder with Geneformer's columns and dtypes",
    )
    tokens.add_argument(
        "--columns",
        nargs="+",
        default=None,
        metavar="COLUMN",
        help="obs columns to include (default: all carried)",
    )
    tokens.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OBS=NAME",
        help="name a column differently in the dataset (Geneformer's custom_attr_name_dict; repeatable)",
    )
    tokens.add_argument("--force", action="store_true", help="replace OUT when it exists")
    tokens.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlflow/mlflow.db)"
    )
    interactions = export_what.add_parser(
        "interactions",
        parents=[common],
        help="a run's ranked gene pairs, for BEELINE, AnnData (varp) or openproblems",
    )
    interactions.add_argument("run_id", metavar="RUN_ID", help="the run that logged the interactions")
    interactions.add_argument("out", metavar="OUT", help="file to write, e.g. rankedEdges.csv or grn.h5ad")
    interactions.add_argument(
        "--format",
        choices=["beeline", "varp", "openproblems"],
        required=True,
        help="beeline: rankedEdges.csv (Gene1, Gene2, EdgeWeight; undirected pairs both ways); varp: "
        ".h5ad with the genes x genes scores in varp['grnx_<extractor>']; openproblems: .h5ad with "
        "uns['prediction'] (source, target, weight), method_id and dataset_id",
    )
    interactions.add_argument(
        "--extractor", default=None, metavar="ID", help="which extractor's pairs, when the run has several"
    )
    interactions.add_argument(
        "--top-k", type=int, default=None, metavar="N", help="write only the best N pairs (default: all)"
    )
    interactions.add_argument(
        "--method-id", default=None, help="openproblems method_id (default: grnx_<extractor>)"
    )
    interactions.add_argument(
        "--dataset-id", default=None, help="openproblems dataset_id (default: the run's recipe name)"
    )
    interactions.add_argument("--force", action="store_true", help="replace OUT when it exists")
    interactions.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlflow/mlflow.db)"
    )
    export.set_defaults(handler=cmd_export)
    return parser


def _stage_of(error: BaseException) -> str | None:
    """The engine stage that was computing when ``error`` was raised, read from its traceback."""
    stage = None
    frame_info = error.__traceback__
    while frame_info is not None:
        frame, value = frame_info.tb_frame, frame_info.tb_frame.f_locals.get("stage")
        if frame.f_globals.get("__name__") == "grnx_core.engine" and isinstance(value, str):
            stage = value  # the innermost stage wins
        frame_info = frame_info.tb_next
    return stage


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`grnx run r.yaml --no-cache seed=1`); argparse leaves those over.
    args, extras = parser.parse_known_args(argv)
    if extras:
        if hasattr(args, "items") and not any(extra.startswith("-") for extra in extras):
            args.items += extras
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except GrnxError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # missing or unreadable files named by the user
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; the run is marked FAILED and finished steps stay cached.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError as error:
        # Nearly always a size in the recipe larger than the machine (n_cells, batch_size, ...).
        if args.debug:
            traceback.print_exc()
        stage = _stage_of(error)
        where = f" in stage {stage!r}" if stage else ""
        detail = f": {error}" if str(error) else ""
        print(
            f"error: out of memory{where}{detail}. A size in the recipe (n_cells, n_genes, batch_size, "
            "max_length and the like) asks for more than this machine holds; lower it, or check the "
            f"component's params with `grnx show`. Finished steps stay cached.",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(
            f"error: unexpected {type(error).__name__}: {error}\n"
            "This is a bug in grnx or a plugin; rerun with --debug for the traceback and report it.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
