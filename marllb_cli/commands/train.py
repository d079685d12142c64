"""`marllb train`: learn LB policies on the simulator (checkpoints every episode, `--resume`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marllb_cli.agents.methods import ALGOS
from marllb_cli.cli_support import ConfigArg, SetOption, console, detail_progress, load, reports_errors
from marllb_cli.errors import ConfigError


def parse_load_range(text: str) -> tuple[float, float]:
    """`0.85` or `0.7:0.95` → (low, high), each a finite load in (0, 2]; else a one-line error."""
    parts = text.split(":")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 < v <= 2 for v in values) or values[0] > values[-1]:
        raise ConfigError(f"--load {text!r}: expected LOAD or LOW:HIGH with 0 < LOW <= HIGH <= 2", hint="e.g. 0.7:0.95")
    return values[0], values[-1]


@reports_errors
def train_command(
    config: ConfigArg,
    algo: Annotated[str, typer.Option(help=f"Algorithm: {', '.join(ALGOS)}.")],
    reward: Annotated[
        str | None, typer.Option(help="Reward (default: jain for isac and ssac, vbf-log otherwise; or the preset's).")
    ] = None,
    episodes: Annotated[
        int | None,
        typer.Option(help="Episodes to train (in total, with --resume; default 72, or the preset's).", min=1),
    ] = None,
    episode_s: Annotated[
        float | None, typer.Option("--episode-s", help="Seconds per episode (default 60, or the preset's).", min=1)
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="A paper's settings: cikm22-moderate, cikm22-large or neurips22 (README, 'Presets'); "
            "--hyper, --reward, --episodes and --episode-s still override them."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the networks, the exploration and the traffic.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Training directory.")] = Path("train"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt.")] = False,
    hyper: Annotated[
        list[str] | None, typer.Option("--hyper", metavar="NAME=VALUE", help="Override a hyperparameter (repeatable).")
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            help="PyTorch threads. The networks are small: one thread trains as fast as two here, and more only "
            "contend with each other and with other runs.",
            min=1,
        ),
    ] = 1,
    env: Annotated[
        str,
        typer.Option(
            help="sim: the simulator's environment; testbed: real episodes through the deployed testbed's LBs."
        ),
    ] = "sim",
    trace: Annotated[
        Path | None,
        typer.Option(help="--env testbed: the trace each episode replays a window of (default: generated Poisson)."),
    ] = None,
    load_range: Annotated[
        str | None,
        typer.Option(
            "--load",
            metavar="LOW[:HIGH]",
            help="Episode loads, drawn uniformly (default: 0.8–1.05 × the config's load); --env testbed needs "
            "`marllb calibrate`.",
        ),
    ] = None,
    speed: Annotated[
        float | None,
        typer.Option(help="--env testbed: replay every episode at this fixed speed instead (no calibration).", min=0),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(help="--env testbed: start from this simulator-trained run's learners (fine-tuning)."),
    ] = None,
    eval_every: Annotated[
        int,
        typer.Option(
            "--eval-every",
            help="Simulator: every N episodes (and after the last) run the greedy policy for an episode on a "
            "validation seed; the curve's greedy_* columns (0: never).",
            min=0,
        ),
    ] = 8,
    set_: SetOption = None,
) -> None:
    """Train per-LB policies; writes checkpoint.pt, policy.pt and curve.parquet into OUT.

    --env sim (default): episodes in the simulator. --env testbed: each episode replays a window of a trace
    through the deployed testbed's LBs, whose agents explore (QMIX and Centr-LB through a coordinator over
    TCP), and the learners update between episodes; each episode is a run in OUT/episodes/. Each episode
    draws its offered load from 0.8–1.05 × the config's load (or --load) and its requests from its own seed.
    Run the result with `marllb simulate CONFIG --method rl:OUT` or `marllb replay-trace ... --method rl:OUT`.
    """
    import torch

    from marllb_cli.presets import preset as paper_preset
    from marllb_cli.presets import training_options
    from marllb_cli.training import hyper_names, parse_hyper, train

    cfg = load(config, set_)
    if env not in ("sim", "testbed"):
        raise ConfigError(f"--env {env!r}: unknown", hint="sim or testbed")
    loads = parse_load_range(load_range) if load_range is not None else None
    if env == "sim":
        for name, given in (("--trace", trace), ("--speed", speed), ("--init", init)):
            if given is not None:
                raise ConfigError(f"{name}: only with --env testbed", hint="the simulator's traffic is the config's")
    overrides = parse_hyper(algo, hyper or [])
    reward, episodes, episode_s, preset_hyper = training_options(
        preset, algo, hyper_names(algo), reward=reward, episodes=episodes, episode_s=episode_s
    )
    overrides = {**preset_hyper, **overrides}
    if preset is not None:
        console.print(f"preset {preset}: {paper_preset(preset).source}")
    torch.set_num_threads(threads)
    bar = detail_progress(f"training {algo}" + (" on the testbed" if env == "testbed" else ""))
    task = bar.add_task("train", total=episodes, detail="", start=False)

    def started(first_episode: int) -> None:
        """Shown once the inputs are checked (and a resumed run loaded), so a refusal is one line alone."""
        bar.start()
        bar.start_task(task)
        bar.update(task, completed=first_episode)

    def progress(row: dict) -> None:
        bar.update(
            task,
            completed=row["episode"] + 1,
            detail=f"reward {row['reward']:.3g}  JCT {row['jct_mean_s'] * 1e3:.0f} ms  "
            f"p99 {row['jct_p99_s'] * 1e3:.0f} ms"
            + (f"  greedy {row['greedy_jct_mean_s'] * 1e3:.0f} ms" if "greedy_jct_mean_s" in row else ""),
        )

    # What both environments take; each adds its own.
    common = dict(
        reward=reward, episodes=episodes, episode_s=episode_s, seed=seed, resume=resume, hyper=overrides
    )  # fmt: skip
    try:
        if env == "testbed":
            from marllb_cli.live_training import LiveOptions, train_live

            options = LiveOptions(out=out, trace=trace, load_range=loads, speed=speed, init=init, **common)

            def episode_progress(data: dict) -> None:
                """Within a live episode: how far its replay is (an episode is a minute of real time)."""
                done = f"{data['done']:,}/{data['total']:,} requests" if data.get("total") else ""
                bar.update(task, detail=f"episode running: {done}  errors {data.get('errors', 0):,}")

            curve = train_live(cfg, algo, options, progress=progress, started=started, replay_progress=episode_progress)
        else:
            curve = train(
                cfg,
                algo,
                out=out,
                load_range=loads,
                eval_every=eval_every,
                progress=progress,
                started=started,
                **common,
            )
    finally:
        bar.stop()
    last = curve.iloc[-1]
    console.print(
        f"{algo}: {len(curve)} episodes, last mean JCT {last['jct_mean_s'] * 1e3:.1f} ms, p99 "
        f"{last['jct_p99_s'] * 1e3:.0f} ms; policy: {out / 'policy.pt'}"
    )
