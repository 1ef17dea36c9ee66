"""CPU clusters and tune's core sets, read from fake sysfs/procfs trees of the boards we target."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from synthetic_runs import make_evaluated_run

from llava_gguf import cli
from llava_gguf.run import machine, topology

ARM_PART = {"Cortex-A520": "0xd80", "Cortex-A720": "0xd81", "Cortex-A55": "0xd05", "Cortex-A76": "0xd0b"}

# One row per CPU: (cpu, core type, cpu_capacity, max MHz, sysfs cluster). None: the file is absent.
#
# Radxa Orion O6 on Radxa's Debian 12 image (kernel 6.1.44-cix, device tree boot): numbering, core
# types and max clocks from sbc-bench's published run, ThomasKaiser/sbc-bench
# results/reviews/Radxa-Orion-O6-1.0.md (cpu0 A720 2600, cpu1-4 A520 1800, cpu5-6 A720 2300,
# cpu7-8 A720 2200, cpu9-11 A720 2500; one sysfs cluster for all 12). CIX's sky1.dtsi as posted
# upstream (linux-kernel, "arm64: dts: cix: add initial CIX P1(SKY1) dts support", Feb 2025) has a
# single cpu-map cluster of 12 cores and capacity-dmips-mhz 1024 (A720) / 403 (A520); the
# capacities here are those scaled by max clock as arm64's topology code does (not read off a board).
O6 = [(0, "Cortex-A720", 1024, 2600, "0-11"), *[(c, "Cortex-A520", 279, 1800, "0-11") for c in (1, 2, 3, 4)],
      (5, "Cortex-A720", 906, 2300, "0-11"), (6, "Cortex-A720", 906, 2300, "0-11"),
      (7, "Cortex-A720", 866, 2200, "0-11"), (8, "Cortex-A720", 866, 2200, "0-11"),
      *[(c, "Cortex-A720", 985, 2500, "0-11") for c in (9, 10, 11)]]
# Raspberry Pi 5: 4x Cortex-A76 at 2400 MHz, one cluster; its device tree gives no
# capacity-dmips-mhz, so the kernel reports 1024 for every core.
PI5 = [(c, "Cortex-A76", 1024, 2400, "0-3") for c in range(4)]
# RK3588 (Radxa ROCK 5B): A55 at cpu0-3 (1800 MHz), A76 in two sysfs clusters, cpu4-5 and cpu6-7
# (2400 MHz), per sbc-bench's results/reviews/Radxa-Rock-5B.md; capacities 1024/414 as the task gives them.
RK3588 = [*[(c, "Cortex-A55", 414, 1800, "0-3") for c in range(4)],
          *[(c, "Cortex-A76", 1024, 2400, "4-5" if c < 6 else "6-7") for c in range(4, 8)]]
# This development machine (read off its /sys, kernel 6.18): 2 vCPUs "AMD EPYC", cpu_capacity 1024,
# no cpufreq, and each CPU a sysfs cluster of its own.
X86 = [(0, "AMD EPYC", 1024, None, "0"), (1, "AMD EPYC", 1024, None, "1")]


def fake_root(tmp_path: Path, rows, online: str | None = "all", cluster_file: str = "cluster_cpus_list") -> Path:
    """A Linux root with /sys/devices/system/cpu and /proc/cpuinfo holding exactly `rows`."""
    root = tmp_path / "root"
    cpu_dir = root / "sys/devices/system/cpu"
    blocks = []
    for cpu, core, capacity, mhz, cluster in rows:
        d = cpu_dir / f"cpu{cpu}"
        (d / "topology").mkdir(parents=True)
        if capacity is not None:
            (d / "cpu_capacity").write_text(f"{capacity}\n")
        if mhz is not None:
            (d / "cpufreq").mkdir()
            (d / "cpufreq/cpuinfo_max_freq").write_text(f"{mhz * 1000}\n")
        if cluster is not None:
            members = topology.parse_cpu_list(cluster)
            text = (f"{sum(1 << c for c in members):08x}" if cluster_file == "cluster_cpus"
                    else cluster)
            (d / "topology" / cluster_file).write_text(text + "\n")
        if core in ARM_PART:
            blocks.append(f"processor\t: {cpu}\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd asimddp\n"
                          f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: {ARM_PART[core]}\n")
        else:
            blocks.append(f"processor\t: {cpu}\nvendor_id\t: AuthenticAMD\nmodel name\t: {core}\nflags\t\t: fpu avx2\n")
    if online == "all":
        online = topology.format_cpu_list(r[0] for r in rows)
    if online is not None:
        (cpu_dir / "online").write_text(online + "\n")
    (root / "proc").mkdir()
    (root / "proc/cpuinfo").write_text("\n".join(blocks) + "\n")
    return root


def sets_of(root: Path, **kw) -> list[tuple[str, str, int, str, bool]]:
    return [(s.label, topology.format_cpu_list(s.cpus), s.threads, s.cpu_mask, s.cpu_strict)
            for s in topology.core_sets(topology.read_topology(root, **kw))]


# ----------------------------------------------------------------------------- the four machines
def test_o6_three_clusters_with_non_contiguous_numbering(tmp_path):
    topo = topology.read_topology(fake_root(tmp_path, O6))
    assert [(c.label, topology.format_cpu_list(c.cpus), c.core_type, c.capacity, c.max_mhz)
            for c in topo.clusters] == [
        ("big", "0,9-11", "Cortex-A720", (1024, 985), (2600, 2500)),
        ("medium", "5-8", "Cortex-A720", (906, 866), (2300, 2200)),
        ("little", "1-4", "Cortex-A520", (279,), (1800,)),
    ]
    assert topo.clusters[0].sysfs_clusters == ((0, 9, 10, 11),)  # the one sysfs cluster, cut to these CPUs
    assert topo.ranked_by == ("cpu_capacity", "cpuinfo_max_freq") and topo.notes == ()
    assert sets_of(fake_root(tmp_path / "again", O6)) == [
        ("big", "0,9-11", 4, "0xe01", True),
        ("big+medium", "0,5-11", 8, "0xfe1", True),
        ("all", "0-11", 12, "0xfff", False),
    ]


def test_o6_clusters_without_capacities_follow_the_clocks(tmp_path):
    rows = [(c, core, None, mhz, cl) for c, core, _, mhz, cl in O6]
    topo = topology.read_topology(fake_root(tmp_path, rows, cluster_file="cluster_cpus"))
    assert [topology.format_cpu_list(c.cpus) for c in topo.clusters] == ["0,9-11", "5-8", "1-4"]
    assert topo.ranked_by == ("cpuinfo_max_freq",)
    assert topo.clusters[1].sysfs_clusters == ((5, 6, 7, 8),)  # read from the hex cluster_cpus mask


def test_raspberry_pi_5_is_one_cluster_and_one_set(tmp_path):
    topo = topology.read_topology(fake_root(tmp_path, PI5))
    assert [(c.label, c.cpus, c.core_type) for c in topo.clusters] == [("all", (0, 1, 2, 3), "Cortex-A76")]
    assert sets_of(fake_root(tmp_path / "again", PI5)) == [("all", "0-3", 4, "0xf", False)]


def test_rk3588_big_cores_span_two_sysfs_clusters(tmp_path):
    topo = topology.read_topology(fake_root(tmp_path, RK3588))
    big, little = topo.clusters
    assert (big.label, big.cpus, big.core_type, big.sysfs_clusters) == \
        ("big", (4, 5, 6, 7), "Cortex-A76", ((4, 5), (6, 7)))
    assert (little.label, little.cpus, little.core_type, little.capacity) == \
        ("little", (0, 1, 2, 3), "Cortex-A55", (414,))
    assert sets_of(fake_root(tmp_path / "again", RK3588)) == [
        ("big", "4-7", 4, "0xf0", True), ("all", "0-7", 8, "0xff", False)]


def test_this_x86_machine_is_one_cluster_of_two(tmp_path):
    topo = topology.read_topology(fake_root(tmp_path, X86))
    assert [(c.label, c.cpus, c.core_type) for c in topo.clusters] == [("all", (0, 1), "AMD EPYC")]
    assert sets_of(fake_root(tmp_path / "again", X86)) == [("all", "0-1", 2, "0x3", False)]


def test_the_real_machine_agrees_with_usable_cores():
    topo = topology.read_topology()
    assert set(topo.usable) <= set(topo.online) and len(topo.usable) == machine.usable_cores() >= 1
    assert sorted(c for cl in topo.clusters for c in cl.cpus) == list(topo.usable)
    assert topology.core_sets(topo)[-1].cpus == topo.usable


# ----------------------------------------------------------------------------- degraded input
def test_no_capacity_and_no_clock_give_one_cluster_and_say_why(tmp_path, caplog):
    rows = [(c, core, None, None, None) for c, core, *_ in O6]
    with caplog.at_level(logging.INFO, logger="llava_gguf.run.topology"):
        topo = topology.read_topology(fake_root(tmp_path, rows))
    assert [(c.label, c.cpus, c.capacity, c.max_mhz) for c in topo.clusters] == [("all", tuple(range(12)), (), ())]
    assert topo.clusters[0].core_type == "8x Cortex-A720 + 4x Cortex-A520"
    assert topo.ranked_by == ()
    assert any("neither cpu_capacity nor cpuinfo_max_freq" in n for n in topo.notes)
    assert "no cpu_capacity for CPUs 0-11" in caplog.text
    assert [s.label for s in topology.core_sets(topo)] == ["all"]


def test_old_x86_kernel_without_capacity_or_cluster_files(tmp_path):
    rows = [(c, "AMD EPYC", None, None, "0-1") for c in (0, 1)]
    topo = topology.read_topology(fake_root(tmp_path, rows, cluster_file="core_siblings_list"))
    assert [(c.label, c.cpus, c.sysfs_clusters) for c in topo.clusters] == [("all", (0, 1), ((0, 1),))]
    assert any("no cpu_capacity" in n for n in topo.notes)


def test_one_missing_capacity_ranks_by_clock_alone(tmp_path):
    rows = [(c, core, None if c == 7 else cap, mhz, cl) for c, core, cap, mhz, cl in RK3588]
    topo = topology.read_topology(fake_root(tmp_path, rows))
    assert topo.ranked_by == ("cpuinfo_max_freq",) and "no cpu_capacity for CPUs 7" in topo.notes[0]
    assert [c.cpus for c in topo.clusters] == [(4, 5, 6, 7), (0, 1, 2, 3)]


def test_an_offline_cpu_is_left_out(tmp_path):
    root = fake_root(tmp_path, RK3588, online="0-5,7")
    topo = topology.read_topology(root)
    assert topo.online == (0, 1, 2, 3, 4, 5, 7) and topo.clusters[0].cpus == (4, 5, 7)
    assert sets_of(root) == [("big", "4-5,7", 3, "0xb0", True), ("all", "0-5,7", 7, "0xbf", False)]


def test_the_affinity_limits_the_cpus(tmp_path):
    root = fake_root(tmp_path, O6)
    topo = topology.read_topology(root, affinity={1, 2, 9, 10})
    assert [(c.label, c.cpus) for c in topo.clusters] == [("big", (9, 10)), ("little", (1, 2))]
    assert sets_of(root, affinity={9, 10, 11}) == [("all", "9-11", 3, "0xe00", False)]


def test_no_online_file_takes_the_listed_cpus(tmp_path):
    topo = topology.read_topology(fake_root(tmp_path, PI5, online=None))
    assert topo.usable == (0, 1, 2, 3) and "online" in topo.notes[0]


def test_an_empty_root_is_an_error_naming_it(tmp_path):
    with pytest.raises(topology.TopologyError, match=str(tmp_path)):
        topology.read_topology(tmp_path)


# ----------------------------------------------------------------------------- llama.cpp options
def test_cpu_mask_is_llama_cpp_hex():
    # parse_cpu_mask (common/common.cpp): optional lower-case 0x, last digit = CPUs 0-3.
    assert topology.cpu_mask([0]) == "0x1" and topology.cpu_mask([4, 5, 6, 7]) == "0xf0"
    assert topology.cpu_mask([0, 9, 10, 11]) == "0xe01" and topology.cpu_mask([64]) == "0x1" + "0" * 16
    with pytest.raises(ValueError):
        topology.cpu_mask([512])
    with pytest.raises(ValueError):
        topology.cpu_mask([])


def test_llama_options_pin_both_thread_pools(tmp_path):
    big, medium, every = topology.core_sets(topology.read_topology(fake_root(tmp_path, O6)))
    assert topology.llama_options(big) == {
        "--threads": "4", "--threads-batch": "4", "--cpu-mask": "0xe01", "--cpu-mask-batch": "0xe01",
        "--cpu-strict": "1", "--cpu-strict-batch": "1"}
    assert topology.llama_argv(medium)[:4] == ["--threads", "8", "--threads-batch", "8"]
    assert topology.llama_argv(every) == ["--threads", "12", "--threads-batch", "12"]


def test_cpu_lists_round_trip():
    assert topology.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert topology.format_cpu_list([11, 0, 9, 10]) == "0,9-11"
    assert topology.parse_sysfs_mask("00000000,00000e01") == [0, 9, 10, 11]


# ----------------------------------------------------------------------------- machine.json and reports
def test_machine_json_and_the_comparison_page_name_the_clusters(write_params, tmp_path, monkeypatch):
    o6 = fake_root(tmp_path, O6)
    monkeypatch.setattr(topology, "read_topology", lambda root="/", affinity=None: _real_read(o6))
    info = machine.machine_info()
    assert (info["cores"], info["usable_cores"]) == (12, 12)
    assert [(c["label"], c["cpu_list"], c["core_type"]) for c in info["clusters"]] == [
        ("big", "0,9-11", "Cortex-A720"), ("medium", "5-8", "Cortex-A720"), ("little", "1-4", "Cortex-A520")]
    line = ("12 cores: big 0,9-11 (4x Cortex-A720, 2600-2500 MHz) / medium 5-8 (4x Cortex-A720, 2300-2200 MHz)"
            " / little 1-4 (4x Cortex-A520, 1800 MHz)")
    assert line in machine.describe(info)
    run = make_evaluated_run(write_params, "o6-clusters")
    page = tmp_path / "compare.html"
    assert cli.main(["compare", str(run.dir), "--out", str(page)]) == 0
    assert "big 0,9-11 (4x Cortex-A720" in page.read_text()


_real_read = topology.read_topology


# ----------------------------------------------------------------------------- tune's thread stage
def test_tune_screens_one_pinned_configuration_per_core_set_on_the_o6(tmp_path):
    from llava_gguf.llama_cpp import flags
    from llava_gguf.tune.config import Config, thread_candidates

    cands = thread_candidates(Config(quant="Q5_K_M"), None, topology.read_topology(fake_root(tmp_path, O6)))
    assert [(c.cores, c.threads, c.cpu_mask, c.cpu_strict) for c in cands] == [
        ("big", 4, "0xe01", 1), ("big+medium", 8, "0xfe1", 1), ("all", 12, None, None)]
    argv = flags.flag_args(cands[0].settings())
    # Both pools pinned: with -tb given, common.cpp no longer copies -C/--cpu-strict to the batch pool.
    for option, value in (("-t", "4"), ("-tb", "4"), ("-C", "0xe01"), ("-Cb", "0xe01"), ("--cpu-strict", "1"),
                          ("--cpu-strict-batch", "1")):
        assert argv[argv.index(option) + 1] == value, argv
    assert "cores big" in cands[0].label


def test_tune_sweeps_thread_counts_on_one_cluster_and_honours_tune_threads(tmp_path):
    from llava_gguf.tune.config import Config, thread_candidates

    base = Config(quant="Q5_K_M")
    pi5 = thread_candidates(base, None, topology.read_topology(fake_root(tmp_path, PI5)))
    assert [(c.threads, c.cpu_mask, c.cores) for c in pi5] == [(1, None, None), (2, None, None), (3, None, None),
                                                              (4, None, None)]
    rk = thread_candidates(base, None, topology.read_topology(fake_root(tmp_path / "rk", RK3588)))
    assert [(c.cores, c.threads, c.cpu_mask) for c in rk] == [("big", 4, "0xf0"), ("all", 8, None)]
    # tune.threads given: the user's counts, unplaced, whatever the clusters.
    assert [c.threads for c in thread_candidates(base, [2, 6], topology.read_topology(fake_root(tmp_path / "o6", O6)))] \
        == [2, 6]
