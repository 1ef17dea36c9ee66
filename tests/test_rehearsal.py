"""The arm64 rehearsal's pieces that run without root, qemu or a network (the rehearsal itself is
`make arm64-rehearsal`, not part of the suite)."""
import subprocess

from llava_gguf.pipeline import rehearsal
from llava_gguf.run import machine
from llava_gguf.llama_cpp import repack, toolchain

# The two load-log lines llama.cpp 0c1e570 writes (llama-bench -v, aarch64 with i8mm).
ARM_LOAD_LOG = """\
load_tensors: loading model tensors, this can take a while... (mmap = true)
repack: repack tensor blk.0.attn_q.weight with q4_K_8x8
repack: repack tensor blk.0.ffn_down.weight with q6_K_8x8
repack: repack tensor blk.1.attn_q.weight with q4_K_8x8
repack: repack tensor output.weight with q8_0_4x8
load_tensors:   CPU_REPACK model buffer size =     1.50 MiB
load_tensors:   CPU_Mapped model buffer size =     3.25 MiB
"""


def test_repack_log_names_tensors_layouts_and_types():
    got = repack.summarize(ARM_LOAD_LOG)
    assert got == {"buffer_mib": 1.5, "tensors": 4, "layouts": {"q4_K_8x8": 2, "q6_K_8x8": 1, "q8_0_4x8": 1},
                   "types": ["q4_K", "q6_K", "q8_0"]}
    assert repack.summarize("load_tensors:   CPU_Mapped model buffer size = 3.25 MiB\n") == {
        "buffer_mib": None, "tensors": 0, "layouts": {}, "types": []}


def test_cross_target_names_the_o6_isa_and_its_own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(tmp_path))
    args = toolchain.O6.cmake_args()
    assert "-DCMAKE_SYSTEM_PROCESSOR=aarch64" in args and "-DGGML_NATIVE=OFF" in args
    assert "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc" in args
    assert f"-DGGML_CPU_ARM_ARCH={toolchain.O6.arm_arch}" in args and "+i8mm" in toolchain.O6.arm_arch
    native, cross = toolchain.default_build_dir(), toolchain.default_build_dir(toolchain.O6)
    assert cross != native and cross.name.startswith(native.name) and "aarch64" in cross.name


def test_host_mirror_read_from_deb822_and_one_line_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert rehearsal.host_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d/debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert rehearsal.host_mirror(tmp_path) == "http://other.example/debian"
    (tmp_path / "sources.list").unlink()
    assert rehearsal.host_mirror(tmp_path) == rehearsal.DEFAULT_MIRROR


def test_host_pip_settings_keep_network_ones_drop_local_paths(monkeypatch):
    listing = ("global.cert='/etc/ssl/certs/ca-certificates.crt'\nglobal.constraint='/etc/xdg/pip/c.txt'\n"
               "global.extra-index-url='file:///opt/pypi/simple https://mirror.example/simple'\n"
               "global.find-links='/opt/wheels'\n:env:.default-timeout='180'\nglobal.index-url='file:///opt/x'\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, listing, ""))
    assert rehearsal.host_pip_settings() == {"extra-index-url": "https://mirror.example/simple",
                                             "default-timeout": "180"}


def test_gpu_packages_found_in_pip_list():
    listing = "numpy==2.3.1\nnvidia_cublas==13.0.0\ntorch==2.10.0\ntriton==3.5.0\ncuda-bindings==13.0\ntritonclient==1\n"
    assert rehearsal.gpu_packages(listing) == ["nvidia_cublas", "triton", "cuda-bindings"]
    assert rehearsal.gpu_packages("numpy==2.3.1\ntorch==2.10.0\n") == []


def test_emulation_is_recorded_and_described(monkeypatch):
    monkeypatch.setenv(machine.EMULATION_ENV, "qemu-user")
    info = machine.machine_info()
    assert info["emulation"] == "qemu-user"
    assert "emulated (qemu-user): timings are not board speed" in machine.describe(info)
    monkeypatch.delenv(machine.EMULATION_ENV)
    assert machine.machine_info()["emulation"] is None and "emulated" not in machine.describe(machine.machine_info())


def test_phases_time_and_mark_failures():
    phases = rehearsal.Phases()
    with phases.timed("good"):
        pass
    try:
        with phases.timed("bad"):
            raise RuntimeError("x")
    except RuntimeError:
        pass
    assert phases.results == {"good": "PASS", "bad": "FAIL"} and set(phases.seconds) == {"good", "bad"}


def test_hwcap_flags_of_an_sve_i8mm_core():
    def pair(key, value):
        return key.to_bytes(8, "little") + value.to_bytes(8, "little")
    hwcap = 1 << 1 | 1 << 20 | 1 << 22  # asimd, asimddp, sve
    hwcap2 = 1 << 1 | 1 << 13 | 1 << 14  # sve2, i8mm, bf16
    auxv = pair(6, 4096) + pair(16, hwcap) + pair(26, hwcap2) + pair(0, 0)
    assert machine.hwcap_flags(auxv) == {"asimd", "asimddp", "sve", "sve2", "i8mm", "bf16"}
    assert machine.hwcap_flags(pair(16, 1 << 1) + pair(0, 0)) == {"asimd"}


def test_a_kept_clone_moves_to_head_and_keeps_its_run_folder_only_when_asked(tmp_path):
    checkout, root = tmp_path / "checkout", tmp_path / "root"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", checkout], check=True)
    (checkout / "README.md").write_text("one\n")
    subprocess.run([*git, "-C", checkout, "add", "."], check=True)
    subprocess.run([*git, "-C", checkout, "commit", "-qm", "one"], check=True)
    target = rehearsal.clone_into(root, checkout)
    run = target / "outputs" / rehearsal.RUN_NAME
    run.mkdir(parents=True)
    (target / ".venv").mkdir()
    (checkout / "README.md").write_text("two\n")
    subprocess.run([*git, "-C", checkout, "commit", "-qam", "two"], check=True)
    rehearsal.clone_into(root, checkout, keep=True, keep_run=True)
    assert (target / "README.md").read_text() == "two\n" and run.is_dir() and (target / ".venv").is_dir()
    rehearsal.clone_into(root, checkout, keep=True)
    assert not run.exists() and (target / ".venv").is_dir()
    rehearsal.clone_into(root, checkout)
    assert not (target / ".venv").exists()
