"""`marllb train`: learn LB policies on the simulator (checkpoints every episode, `--resume`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marllb_cli.agents.methods import ALGOS
from marllb_cli.cli_support import ConfigArg, SetOption, console, detail_progress, load, reports_errors


@reports_errors
def train_command(
    config: ConfigArg,
    algo: Annotated[str, typer.Option(help=f"Algorithm: {', '.join(ALGOS)}.")],
    reward: Annotated[str | None, typer.Option(help="Reward (default: jain; vbf-log for distr).")] = None,
    episodes: Annotated[int, typer.Option(help="Episodes to train (in total, with --resume).", min=1)] = 72,
    episode_s: Annotated[float, typer.Option("--episode-s", help="Simulated seconds per episode.", min=1)] = 60.0,
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
    set_: SetOption = None,
) -> None:
    """Train per-LB policies in the simulator; writes checkpoint.pt, policy.pt and curve.parquet into OUT.

    Each episode draws its offered load from 0.8–1.05 × the config's load and its requests from its own
    seed. Run the result with `marllb simulate CONFIG --method rl:OUT`.
    """
    import torch

    from marllb_cli.training import parse_hyper, train

    cfg = load(config, set_)
    overrides = parse_hyper(algo, hyper or [])
    torch.set_num_threads(threads)
    bar = detail_progress(f"training {algo}")
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
            f"p99 {row['jct_p99_s'] * 1e3:.0f} ms",
        )

    try:
        curve = train(
            cfg,
            algo,
            out=out,
            reward=reward,
            episodes=episodes,
            episode_s=episode_s,
            seed=seed,
            resume=resume,
            hyper=overrides,
            progress=progress,
            started=started,
        )
    finally:
        bar.stop()
    last = curve.iloc[-1]
    console.print(
        f"{algo}: {len(curve)} episodes, last mean JCT {last['jct_mean_s'] * 1e3:.1f} ms, p99 "
        f"{last['jct_p99_s'] * 1e3:.0f} ms; policy: {out / 'policy.pt'}"
    )
