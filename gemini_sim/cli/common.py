"""What the gemini-sim verbs share: the one-line-error parser, preset and trace arguments, progress bars."""

from __future__ import annotations

import argparse

from gemini_sim.cli import inputs
from gemini_sim.cluster import config
from gemini_sim.errors import UserError
from gemini_sim.failures import synthetic, traces


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default adds a usage block)
        raise UserError(f"{message} (see '{self.prog} --help')")


def add_preset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="gemini-paper", help=f"bundled preset: {', '.join(config.preset_names())}")
    g.add_argument("--config", metavar="FILE", help="your own preset TOML (same format as gemini_sim/cluster/presets/)")
    p.add_argument("--replicas", type=inputs.REPLICAS,
                   help="override the preset's checkpoint replicas in CPU memory (m)")


def preset_of(args) -> config.Preset:
    preset = config.load_config(args.config) if args.config else config.load_preset(args.preset)
    if getattr(args, "replicas", None) is not None:
        data_where = args.config or f"preset {args.preset}"
        preset = preset.with_replicas(args.replicas)
        config.check_consistency(f"{data_where} with --replicas {args.replicas}", preset)
    return preset


def add_trace_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--trace", nargs="+", action="extend", metavar="FILE", help="failure trace CSV(s)")
    g.add_argument("--synthetic", choices=synthetic.MODELS, help="generate a seeded synthetic trace")
    p.add_argument("--mtbf-hours", type=inputs.HOURS, default=synthetic.DEFAULT_MTBF_HOURS,
                   help="synthetic: mean time between failures of ONE machine "
                        f"(default {synthetic.DEFAULT_MTBF_HOURS}, "
                        f"Llama 3 405B's rate)")
    p.add_argument("--days", type=inputs.DAYS, default=30.0, help="synthetic: length of the job (default 30)")
    p.add_argument("--seed", type=inputs.SEED, default=0, help="seed for synthetic traces and for which machines fail")
    p.add_argument("--weibull-shape", type=inputs.number(0, 100, lo_open=True), default=synthetic.DEFAULT_WEIBULL_SHAPE)
    p.add_argument("--burst-probability", type=inputs.FRACTION, default=0.1,
                   help="synthetic burst: share of events that "
                   "take a whole rack")
    p.add_argument("--burst-size", type=inputs.whole(1, 1_000_000),
                   help="synthetic burst: machines in a burst (default: the preset's "
                   "machines_per_rack, else 4)")


def traces_of(args, preset: config.Preset) -> list[traces.Trace]:
    if args.trace:
        return [traces.load_trace(path) for path in args.trace]
    return [synthetic.for_cluster(args.synthetic, preset.cluster.machines, preset.cluster.machines_per_rack,
                                  mtbf_hours=args.mtbf_hours, days=args.days, seed=args.seed,
                                  burst_size=args.burst_size, weibull_shape=args.weibull_shape,
                                  burst_probability=args.burst_probability)]


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="replay", unit="failure", disable=not enabled or None, leave=False)
    return bar
