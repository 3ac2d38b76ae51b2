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


def add_setup_args(p: argparse.ArgumentParser) -> None:
    """A measured timeline or a whole measured set-up, instead of the preset's ZeRO-3 model (:func:`setup_of`)."""
    p.add_argument("--profile", metavar="FILE", help="use a measured timeline (profile JSON) instead of ZeRO-3's")
    p.add_argument("--setup", metavar="RUN_DIR", help="simulate a measured runtime set-up (its probe.json and "
                   "profile.json, with the host's measured costs) instead of a preset")
    p.add_argument("--span-fill", type=inputs.number(0, 1, lo_open=True), default=1.0,
                   help="gemini: fill at most this fraction of each idle span (default 1)")


def setup_of(args):
    """(preset, timeline or None, host CPU per checkpoint as a function of the replicas or None) from --setup, else
    from the preset (--preset/--config/--replicas) and --profile."""
    from gemini_sim.cluster import workload

    if args.setup:
        from gemini_sim import calibration

        if args.profile or args.config:
            raise UserError("--setup brings its own cluster and profile; drop --profile/--config")
        preset, timeline, _ = calibration.setup_preset(args.setup, replicas=args.replicas or 2)
        return preset, timeline, lambda m: calibration.host_cpu_s(args.setup, m)
    preset = preset_of(args)
    if not args.profile:
        return preset, None, None
    timeline = workload.from_profile(workload.load_profile(args.profile))
    if timeline.machines != preset.cluster.machines:
        raise UserError(f"{args.profile}: profile has {timeline.machines} machines but the preset has "
                        f"{preset.cluster.machines}; use --config with a matching cluster")
    return preset, timeline, None


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
    p.add_argument("--weibull-shape", type=inputs.number(*synthetic.WEIBULL_SHAPES),
                   default=synthetic.DEFAULT_WEIBULL_SHAPE)
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
