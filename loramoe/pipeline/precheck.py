"""The flow's config checked before Metaflow starts anything.

A typo in a config or a bad `--scales` used to surface inside the start step: a run id, the
runtime's traceback banner, and on `--with kubernetes` a worker started for it. The flow's
command line (`python flows/full_pipeline.py [--config config PATH] [--with X] run
[--scales ...] ...`) is read here first and the config validated as the start step will
validate it; a problem ends the command with one message naming the field. The start step
still validates the same config: it is the flow's one source of truth, this a courtesy.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from loramoe.fields import problems_of
from loramoe.pipeline.config import PipelineConfig, PipelineConfigError

# The run command's options that override the config (the flow's Parameters) -> with_overrides
RUN_OVERRIDES = {"--scales": "scales", "--methods": "methods", "--max-steps": "max_steps",
                 "--seeds": "seeds"}
REMOTE_WORKERS = ("kubernetes", "batch")  # `--with` values whose steps run elsewhere


@dataclass
class RunCommand:
    """What a `run` command line asks of the config."""

    config: Path
    overrides: dict[str, str | int] = field(default_factory=dict)
    workers_elsewhere: bool = False


def config_file(argv: list[str], default_config: Path,
                environ: Mapping[str, str] = os.environ) -> Path | None:
    """The config file the flow's command line names, as Metaflow reads it: `--config config
    FILE`, else METAFLOW_FLOW_CONFIG's ('{"config": "FILE"}'), else the default. None when the
    config is given as a value (`--config-value`, METAFLOW_FLOW_CONFIG_VALUE) or the variable
    is not a JSON mapping (Metaflow's own parser names it)."""
    if "--config-value" in argv or environ.get("METAFLOW_FLOW_CONFIG_VALUE"):
        return None
    for i, arg in enumerate(argv[:-2]):
        if arg == "--config" and argv[i + 1] == "config":
            return Path(argv[i + 2])
    try:
        from_env = json.loads(environ.get("METAFLOW_FLOW_CONFIG") or "{}").get("config")
    except (ValueError, AttributeError):
        return None
    return Path(from_env) if from_env else default_config


def read_run_command(argv: list[str], default_config: Path,
                     environ: Mapping[str, str] = os.environ) -> RunCommand | None:
    """The config file, overrides and worker kind of `argv` (sys.argv of the flow file);
    None when the command is not `run` (resume, show, argo-workflows, ... check their own)
    or `config_file` names no file (a config given as a value: the start step checks it)."""
    args = argv[1:]
    if "run" not in args:
        return None
    at = args.index("run")
    run = args[at + 1:]
    config = config_file(args[:at], default_config, environ)
    if config is None:
        return None
    command = RunCommand(config)
    for i, arg in enumerate(args):  # `--with X` goes before `run` or after it
        name, has_value, value = arg.partition("=")
        if name == "--with" and not has_value:
            value = args[i + 1] if i + 1 < len(args) else ""
        if name == "--with" and value.split(":")[0] in REMOTE_WORKERS:
            command.workers_elsewhere = True
    for i, arg in enumerate(run):
        name, has_value, value = arg.partition("=")
        if name not in RUN_OVERRIDES:
            continue
        if not has_value:
            value = run[i + 1] if i + 1 < len(run) else ""
        if name == "--max-steps":
            try:  # "-5" too, which Metaflow's parser takes as the integer it is
                value = int(value)
            except ValueError:
                continue  # not an integer: the command line's own parser says so
        command.overrides[RUN_OVERRIDES[name]] = value
    return command


def check_config(config: Path, base_dir: Path, overrides: dict | None = None,
                 workers_elsewhere: bool = False) -> PipelineConfig | None:
    """The config as the start step reads it (relative task paths from base_dir), with the
    run's overrides; PipelineConfigError naming every problem. A local model folder missing
    here is only warned about where the steps run elsewhere (it may exist on the workers
    only, whose start step checks it again); then None is returned."""
    try:
        data = tomllib.loads(config.read_text())
    except OSError as err:
        raise PipelineConfigError(f"cannot read the config: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise PipelineConfigError(f"not valid TOML: {err}") from None
    try:
        return PipelineConfig.from_dict(data, base_dir=base_dir).with_overrides(
            **(overrides or {}))
    except PipelineConfigError as err:
        if not (workers_elsewhere and all(".model: " in p for p in problems_of(err))):
            raise
        print(f"warning: {err} (checked again on the workers)", file=sys.stderr)
        return None


def check_run_command_or_exit(argv: list[str], default_config: Path, base_dir: Path) -> None:
    """For the flow file's main: exit 2 with the config's problems before Metaflow starts."""
    command = read_run_command(argv, default_config)
    if command is None:
        return
    try:
        check_config(command.config, base_dir, command.overrides, command.workers_elsewhere)
    except PipelineConfigError as err:
        print(f"error: config {command.config}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
