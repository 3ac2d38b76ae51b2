import math

import pytest

from gemini_sim.cluster import config
from gemini_sim.cluster.config import GBPS
from gemini_sim.errors import UserError

MINIMAL = """
[cluster]
machines = 4
gpus_per_machine = 8
gpu = "A100"
gpu_memory_gb = 40
gpu_peak_tflops = 312
cpu_memory_gb = 512
network_gbps = 100
pcie_gbps = 200
[model]
name = "tiny"
parameters = 1e9
layers = 8
hidden = 1024
seq_len = 1024
global_batch_tokens = 1e6
mfu = 0.4
[storage]
remote_gbps = 10
"""


def test_bundled_presets_load_and_match_the_issue():
    assert {"gemini-paper", "opt-175b", "llama3-405b"} <= set(config.preset_names())
    p = config.load_preset("gemini-paper")
    assert (p.cluster.machines, p.cluster.gpus_per_machine, p.cluster.cpu_memory_gb) == (16, 8, 1152)
    assert (p.cluster.network_gbps, p.storage.remote_gbps) == (400, 20)
    assert config.load_preset("opt-175b").cluster.gpus == 992
    llama = config.load_preset("llama3-405b")
    assert (llama.cluster.gpus, llama.cluster.machines) == (16384, 2048)


def test_bytes_per_param_reproduces_the_papers_mt_nlg_figure():
    # GEMINI: MT-NLG 530B takes ~42 minutes to checkpoint to remote storage at 20 Gbps.
    p = config.load_preset("gemini-paper")
    seconds = 530e9 * p.model.bytes_per_param / (20 * GBPS)
    assert 41 <= seconds / 60 <= 43


def test_derived_quantities():
    p = config.load_preset("gemini-paper")
    assert p.checkpoint_bytes == pytest.approx(39e9 * 12)
    assert p.checkpoint_bytes_per_machine == pytest.approx(p.checkpoint_bytes / 16)
    assert p.remote_write_s == pytest.approx(p.checkpoint_bytes / 2.5e9)
    expected_iter = 6 * 39e9 * 1048576 / (128 * 312e12 * 0.4)
    assert p.iteration_time_s == pytest.approx(expected_iter)


def test_user_config_with_defaults(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL)
    p = config.load_config(f)
    assert p.name == "mine" and p.recovery.replicas == 2 and math.isfinite(p.iteration_time_s)


@pytest.mark.parametrize("edit, needle", [
    (("mfu = 0.4", "mfu = 0.4\nflops = 3"), "unknown key 'model.flops'"),
    (("machines = 4", "machines = 0"), "'cluster.machines' must be >= 1"),
    (("machines = 4", "machines = 4.5"), "'cluster.machines' must be an integer"),
    (("remote_gbps = 10", "remote_gbps = -1"), "'storage.remote_gbps' must be >= 1e-06"),
    (("machines = 4", "machines = 4000000000"), "'cluster.machines' must be <= 1e+06"),
    (("mfu = 0.4", "mfu = nan"), "invalid TOML: number nan is out of range"),
    (("remote_gbps = 10", "remote_gbps = inf"), "invalid TOML: number inf is out of range"),
    (("remote_gbps = 10", "remote_gbps = 1e400"), "out of range"),
    (("parameters = ", "parameters = 1e300 #"), "'model.parameters' must be <= 1e+15"),
    (("gpu = \"A100\"", "gpu = 7"), "'cluster.gpu' must be a non-empty string"),
    (("mfu = 0.4", "mfu = 1.5"), "'model.mfu' must be <= 1"),
    (("pcie_gbps = 200", "pcie_gbps = \"fast\""), "'cluster.pcie_gbps' must be a number"),
    (("[storage]\nremote_gbps = 10", ""), "missing table [storage]"),
    (("layers = 8\n", ""), "missing key 'model.layers'"),
    (("[cluster]", "[clutser]\nx=1\n[cluster]"), "unknown key 'clutser'"),
    (("cpu_memory_gb = 512", "cpu_memory_gb = 1"), "GB missing"),
    (("[cluster]", "[cluster]\nmachine_type = \"p9.huge\""), "'cluster.machine_type': unknown machine type "
                                                               "'p9.huge'; valid: h100-lent, hgx-h100"),
    (("[cluster]", "[cluster]\nmachine_type = 3"), "'cluster.machine_type' must be a non-empty string"),
    (("pcie_gbps = 200", "pcie_gbps = 200\ncopy_slowdown = 1"), "'cluster.copy_slowdown' must be <= 0.99"),
    (("pcie_gbps = 200", "pcie_gbps = 200\nh2d_gbps = -1"), "'cluster.h2d_gbps' must be >= 0"),
])
def test_bad_configs_name_the_key(tmp_path, edit, needle):
    f = tmp_path / "bad.toml"
    f.write_text(MINIMAL.replace(*edit))
    with pytest.raises(UserError) as exc:
        config.load_config(f)
    assert needle in str(exc.value) and str(f) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_machine_type_fills_the_cluster_keys_a_preset_leaves_out(tmp_path):
    from gemini_sim.cluster.machines import MACHINE_TYPES

    p5 = MACHINE_TYPES["p5.48xlarge"]
    f = tmp_path / "p5.toml"
    f.write_text(MINIMAL[MINIMAL.index("[model]"):] + "[cluster]\nmachine_type = 'p5.48xlarge'\nmachines = 4\n"
                 "network_gbps = 800\n")
    c = config.load_config(f).cluster
    assert (c.machine_type, c.machines, c.gpus_per_machine, c.gpu) == ("p5.48xlarge", 4, 8, "H100-80GB")
    assert c.network_gbps == 800  # the preset's own key wins over the type's 3200
    # the H100's measured per-GPU host copies (../shared/GPU.md) times 8 GPUs
    assert c.pcie_gbps == pytest.approx(8 * 54.8 * 8) and c.h2d == pytest.approx(8 * 51.6 * 8)
    assert c.copy_slowdown == 0.015 and p5.pageable_d2h_gbps == pytest.approx(8 * 12.0 * 8)
    for t in MACHINE_TYPES.values():  # every figure is sourced and passes the preset bounds
        assert t.source and config.preset_from_dict({"cluster": {"machine_type": t.name, "machines": 2},
                                                     "model": {"name": "m", "parameters": 1e6, "layers": 1,
                                                               "hidden": 1, "seq_len": 1, "global_batch_tokens": 1,
                                                               "mfu": 0.5},
                                                     "storage": {"remote_gbps": 1}}).cluster.gpu == t.gpu
    # without h2d_gbps the recovery copy runs at the GPU-to-CPU rate; with it, at its own
    plain = config.load_config(_write(tmp_path, MINIMAL))
    assert plain.cpu_to_gpu_s == plain.gpu_to_cpu_s
    fast_back = config.load_config(_write(tmp_path, MINIMAL.replace("pcie_gbps = 200", "pcie_gbps = 200\n"
                                                                                        "h2d_gbps = 400")))
    assert fast_back.cpu_to_gpu_s == pytest.approx(plain.gpu_to_cpu_s / 2)


def _write(tmp_path, text):
    f = tmp_path / "preset.toml"
    f.write_text(text)
    return f


def test_invalid_toml_and_missing_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[cluster\nmachines=")
    with pytest.raises(UserError, match="invalid TOML"):
        config.load_config(f)
    with pytest.raises(UserError, match="cannot read config"):
        config.load_config(tmp_path / "absent.toml")


def test_cli_bad_config_is_one_line_exit_2(tmp_path, cli):
    f = tmp_path / "bad.toml"
    f.write_text(MINIMAL.replace("mfu = 0.4", "mfu = 0.4\nbogus = 1"))
    rc, out, err = cli("replay", "--synthetic", "poisson", "--config", f, check_rc=2)
    assert err.count("\n") == 1 and "unknown key 'model.bogus'" in err and "Traceback" not in err
