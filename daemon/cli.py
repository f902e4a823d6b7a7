"""The ``minerd`` command line.

Bad input never prints a traceback: usage and config problems are one line
each on stderr and exit 2, before anything is written to the state directory.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import typer

try:  # typer >= 0.20 vendors click; older ones use the click package
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    import click.exceptions as click_exc  # type: ignore[no-redef]

from daemon.config import Config, ConfigError, to_yaml
from daemon.run.catalog import CATALOG

EXIT_USAGE = 2

app = typer.Typer(
    name="minerd",
    help="A long-running training miner with a monitoring service.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Show or check the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Prepare, inspect and replay token datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file")
SetOpt = typer.Option([], "--set", help="override: section.key=value (repeatable)")


def _err(line: str) -> None:
    typer.echo(line, err=True)


def _load(config: str | None, sets: list[str], notes: bool = True) -> Config:
    """The config, or exit 2 with one line per problem. ``notes``: print a line on stderr per
    old key name used (``minerd run`` logs them instead, where its other lines go)."""
    try:
        cfg = CATALOG.load(config, sets)
    except ConfigError as exc:
        for problem in exc.problems:
            _err(problem)
        raise typer.Exit(EXIT_USAGE) from None
    for note in cfg.deprecations if notes else ():
        _err(note)
    return cfg


@app.command()
def run(config: str | None = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Run the miner until stopped (or until train.max_steps inner steps)."""
    cfg = _load(config, set_, notes=False)
    from daemon.run.runner import run as run_miner  # torch is imported only by commands that need it

    raise typer.Exit(run_miner(cfg))


@app.command()
def aggregate(config: str | None = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Run the bucket exchange's aggregator: score each round's submissions, publish the next global model."""
    cfg = _load(config, set_, notes=False)
    from daemon.run.aggregate import run_aggregator

    raise typer.Exit(run_aggregator(cfg))


@config_app.command("show")
def config_show(config: str | None = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Print the resolved config as YAML, secrets masked."""
    typer.echo(to_yaml(_load(config, set_)), nl=False)


@config_app.command("validate")
def config_validate(config: str | None = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Check the config: exit 0 when valid, 2 with one line per problem otherwise."""
    _load(config, set_)
    typer.echo("config ok")


@app.command()
def diagnose(
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when a red flag is raised (the memory plan's too)"),
    world_size: int | None = typer.Option(None, "--world-size", min=1, help="plan memory per rank for this many "
                                          "ranks (default: the launch's; 1 outside torchrun)"),
    config: str | None = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Print the GPU diagnostics block, its red flags and the memory plan per rank, without training."""
    cfg = _load(config, set_)
    import torch

    from daemon import diagnostics, memory_plan
    from daemon.distributed import Launch
    from daemon.run.machine import resolve_device

    launch = Launch.from_env()
    # Another world size than this launch's is only planned: the model is built on the meta
    # device (shapes, no storage), so a laptop plans an 8B model for a GPU machine.
    planning = world_size is not None and world_size != launch.world_size
    ranks = world_size or launch.world_size
    try:
        try:
            device = resolve_device(cfg, launch)
        except ConfigError:
            if not planning:
                raise
            device = torch.device("cuda")  # a GPU machine planned from one without: its size unknown
        model = CATALOG.meta_model(cfg) if planning else CATALOG.task_for(cfg).diagnose_model(cfg, device)
    except ConfigError as exc:
        for problem in exc.problems:
            _err(problem)
        raise typer.Exit(EXIT_USAGE) from None
    diag = diagnostics.collect(cfg, next(model.parameters()).device, ranks, model)
    plan = memory_plan.plan(cfg, ranks, model, device)
    if json_out:
        typer.echo(json.dumps({**diag.model_dump(), "memory_plan": plan.as_dict()}, indent=2))
    else:
        typer.echo("\n".join([*diagnostics.render(diag), *memory_plan.lines(plan)]))
    if strict and (diag.red_flags or memory_plan.refusal(plan)):
        raise typer.Exit(1)


@app.command()
def status(
    url: str = typer.Option("http://127.0.0.1:9108", "--url", help="the miner's API base URL"),
    json_out: bool = typer.Option(False, "--json", help="print the raw /status JSON"),
) -> None:
    """Summarise /status of a running miner; exit 1 when it is unreachable."""
    from daemon.status_cmd import run_status

    raise typer.Exit(run_status(url, json_out))


@app.command("verify-upload")
def verify_upload(
    target: str = typer.Argument(..., help="a directory or s3://bucket/prefix"),
    endpoint_url: str = typer.Option("", "--endpoint-url", help="S3-compatible endpoint (R2, MinIO)"),
    max_params: int | None = typer.Option(None, "--max-params", min=1, help="most parameters a revision without "
                                          "its weights may describe (default: 2e9, twice llama-1b's; "
                                          "raise it for llama-3b or llama-8b)"),
) -> None:
    """Check a published target as a validator would: pointer, manifest, sizes, sha256; a Hugging Face
    revision must also load offline with from_pretrained and give a finite loss on a fixed text. Every
    file is treated as hostile: reads are bounded, no code of the upload's runs."""
    from daemon.upload import LIMITS, verify_target

    limits = replace(LIMITS, params=max_params) if max_params else LIMITS
    problems = verify_target(target, endpoint_url or None, limits)
    for problem in problems:
        _err(problem)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{target}: ok")


@data_app.command("prepare")
def data_prepare(
    sources: list[str] = typer.Argument(..., help="files, directories or globs (.txt .md .py .jsonl .parquet)"),
    out: str = typer.Option(..., "--out", "-o", help="the dataset: a directory or s3://bucket/prefix"),
    tokenizer: str = typer.Option("", "--tokenizer", help="tokenizer.json or a tokenizer directory (default: the "
                                  "one already in --out, else a BPE trained on the sources)"),
    vocab_size: int = typer.Option(8192, "--vocab-size", min=512, max=1_048_576, help="of the BPE trained"),
    shard_tokens: int = typer.Option(1 << 26, "--shard-tokens", min=1024, max=1 << 32, help="tokens per shard"),
    workers: int = typer.Option(0, "--workers", min=0, max=256, help="tokenising processes (0: one per core)"),
    eval_fraction: float = typer.Option(0.01, "--eval-fraction", min=0.0, max=0.5,
                                        help="share of documents held out"),
) -> None:
    """Tokenise sources into fixed-size token shards and an index (resumable, appendable)."""
    from daemon.cores import machine_cores
    from daemon.data.prepared.commands import run_prepare

    count = workers or machine_cores()
    raise typer.Exit(run_prepare(sources, out, tokenizer, vocab_size, shard_tokens, count, eval_fraction))


@data_app.command("inspect")
def data_inspect(
    dest: str = typer.Argument(..., help="a prepared dataset: a directory or s3://bucket/prefix"),
    verify: bool = typer.Option(False, "--verify", help="check every shard's size and sha256"),
) -> None:
    """Print a dataset's shards, tokens and bytes per split; --verify checks every checksum."""
    from daemon.data.prepared.commands import run_inspect

    raise typer.Exit(run_inspect(dest, verify))


@data_app.command("sample")
def data_sample(
    dataset: str = typer.Option("", "--dataset", help="a prepared dataset (default: lm.dataset)"),
    seed: int | None = typer.Option(None, "--seed", help="default: train.seed"),
    replica: int = typer.Option(0, "--replica", min=0),
    replicas: int | None = typer.Option(None, "--replicas", min=0, help="default: lm.replicas"),
    rank: int = typer.Option(0, "--rank", min=0),
    world_size: int = typer.Option(1, "--world-size", min=1, help="torchrun ranks of each replica"),
    window: int = typer.Option(0, "--window", min=0, help="the outer step (0 = the first)"),
    digest: bool = typer.Option(False, "--digest", help="print only the sha256 of the ids"),
    config: str | None = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Print the sequence ids a miner trained on in a window (one per line), as a validator replays them."""
    from daemon.data.prepared.commands import run_sample
    from daemon.diagnostics import accumulation_steps
    from daemon.tasks.causal_lm.config import LmConfig

    cfg = _load(config, set_)
    lm = LmConfig.of(cfg)
    if not (dataset or lm.dataset):
        _err("minerd: error: --dataset: name a prepared dataset (or set lm.dataset)")
        raise typer.Exit(EXIT_USAGE)
    micro = cfg.train.inner_steps_per_outer * accumulation_steps(cfg, world_size)
    raise typer.Exit(run_sample(dataset or lm.dataset, cfg.train.seed if seed is None else seed, replica,
                                lm.replicas if replicas is None else replicas, rank, world_size, window,
                                lm.seq_len, cfg.train.batch_size, micro, digest))


@app.command()
def bundle(
    out: str = typer.Option("", "--out", "-o", help="file to write (default: ./minerd-bundle-<UTC time>.md)"),
    log: list[str] = typer.Option([], "--log", help="a log file to read as well (repeatable)"),
    url: str = typer.Option("", "--url", help="the running miner's API base URL (default: from the config)"),
    config: str | None = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Write a support bundle: diagnostics, last step lines, warnings/errors, uploads, config, versions."""
    from pathlib import Path

    from daemon.bundle import build_bundle, default_out_path, write_bundle
    from daemon.urls import http_url_problem

    if url and (why := http_url_problem(url)):
        _err(f"minerd: error: --url {why} (got {url!r})")
        raise typer.Exit(EXIT_USAGE)

    origin = f"Resolved from {config or 'the built-in defaults'} < MINERD_* environment < --set, as this " \
             "command sees them (a miner started by pm2/systemd may have had another environment)."
    problems: list[str] = []
    try:
        cfg = CATALOG.load(config, set_)
    except ConfigError as exc:  # a broken config is exactly when people need the bundle
        problems = exc.problems
        cfg = CATALOG.default_config()
    text, logs = build_bundle(cfg, config_problems=problems, config_origin=origin, log_files=log, url=url or None)
    path = Path(out) if out else default_out_path()
    try:
        write_bundle(path, text)
    except OSError as exc:
        _err(f"minerd: error: cannot write {path}: {exc.strerror or exc}")
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path} ({len(text)} bytes); logs read: {len(logs.read)} source(s)")
    for source in logs.read:
        typer.echo(f"  {source}")
    if not logs.read:
        typer.echo("  no logs found: pass --log FILE (pm2 writes ~/.pm2/logs/distributed-training-miner-error.log)")


def main(argv: list[str] | None = None) -> None:
    try:
        rv = app(args=argv, prog_name="minerd", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click_exc.UsageError as exc:
        _err(f"minerd: error: {exc.format_message()}")
        sys.exit(EXIT_USAGE)
    except click_exc.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `minerd`: help, as the user asked for it
            typer.echo(exc.format_message())
            sys.exit(0)
        _err(f"minerd: error: {exc.format_message()}")
        sys.exit(EXIT_USAGE)
    sys.exit(rv if isinstance(rv, int) else 0)
