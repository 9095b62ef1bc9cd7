"""GPU discovery (ops/gpus.py): NVML, the nvidia-smi fallback, LOCALQ_SIMULATE_GPUS, --gpus selection,
and where the backends run a model (workers/devices.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ops import gpus
from ops.cli import main
from ops.gpus import GIB, Gpu, GpuSelectionError

MIB = 1024**2
SMI_OUTPUT = "0, NVIDIA GeForce RTX 3090, 24576\n1, NVIDIA A100-SXM4-80GB, 81920\n"


class FakeNvml:
    """The pynvml calls ops.gpus makes, over a fixed list of (name, memory) devices."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices, fail_init=False, name_as_bytes=False):
        self.devices, self.fail_init, self.name_as_bytes = devices, fail_init, name_as_bytes
        self.calls = []

    def nvmlInit(self):
        self.calls.append("init")
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        name = self.devices[handle][0]
        return name.encode() if self.name_as_bytes else name

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=self.devices[handle][1], free=0, used=0)


@pytest.fixture
def no_nvml(monkeypatch):
    def missing():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(gpus, "_import_nvml", missing)


@pytest.fixture
def smi(monkeypatch):
    """Replace subprocess.run for nvidia-smi; set .result to a CompletedProcess or an exception."""
    state = SimpleNamespace(result=None, argv=None)

    def run(argv, **kwargs):
        state.argv = argv
        if isinstance(state.result, BaseException):
            raise state.result
        return state.result

    monkeypatch.setattr(gpus.subprocess, "run", run)
    return state


def completed(stdout="", returncode=0, stderr=""):
    return subprocess.CompletedProcess(gpus.NVIDIA_SMI_ARGV, returncode, stdout, stderr)


# --- NVML ------------------------------------------------------------------------------------


def test_nvml_lists_gpus_by_index_and_shuts_down(monkeypatch, smi):
    nvml = FakeNvml([("NVIDIA H100 80GB HBM3", 80 * GIB), ("NVIDIA L4", 24 * GIB)], name_as_bytes=True)
    monkeypatch.setattr(gpus, "_import_nvml", lambda: nvml)
    smi.result = AssertionError("nvidia-smi must not run when NVML answers")
    found, source = gpus.find_gpus({})
    assert source == "nvml"
    assert found == [Gpu(0, "NVIDIA H100 80GB HBM3", 80 * GIB), Gpu(1, "NVIDIA L4", 24 * GIB)]
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_that_cannot_start_falls_back_to_nvidia_smi(monkeypatch, smi):
    monkeypatch.setattr(gpus, "_import_nvml", lambda: FakeNvml([], fail_init=True))
    smi.result = completed(SMI_OUTPUT)
    found, source = gpus.find_gpus({})
    assert source == "nvidia-smi"
    assert smi.argv == ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
    assert found == [Gpu(0, "NVIDIA GeForce RTX 3090", 24576 * MIB), Gpu(1, "NVIDIA A100-SXM4-80GB", 81920 * MIB)]


def test_no_nvml_module_and_no_nvidia_smi_means_no_gpus(no_nvml, smi):
    smi.result = FileNotFoundError("nvidia-smi")
    assert gpus.find_gpus({}) == ([], "none")
    assert gpus.discover({}) == []


@pytest.mark.parametrize("result", [completed("", returncode=9, stderr="NVIDIA-SMI has failed"),
                                    subprocess.TimeoutExpired("nvidia-smi", 20)])
def test_failing_nvidia_smi_means_no_gpus(no_nvml, smi, result):
    smi.result = result
    assert gpus.find_gpus({}) == ([], "none")


def test_nvidia_smi_output_parsing():
    text = ("1, Tesla T4, 15360\n"
            "0, NVIDIA GeForce RTX 4090, [N/A]\n"          # memory unknown: 0
            "2, Weird, Name, With Commas, 1024\n"           # commas in the name survive
            "\n"
            "No devices were found\n")
    assert gpus.parse_nvidia_smi(text) == [
        Gpu(0, "NVIDIA GeForce RTX 4090", 0),
        Gpu(1, "Tesla T4", 15360 * MIB),
        Gpu(2, "Weird, Name, With Commas", 1024 * MIB),
    ]
    assert gpus.parse_nvidia_smi("") == []


def test_discovery_does_not_import_cuda_libraries():
    code = ("import sys, ops.gpus; ops.gpus.find_gpus({}); "
            "assert not {'torch', 'llama_cpp', 'ctranslate2'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)


# --- LOCALQ_SIMULATE_GPUS --------------------------------------------------------------------


def test_simulated_gpus_replace_discovery(monkeypatch):
    monkeypatch.setattr(gpus, "_import_nvml", lambda: pytest.fail("NVML must not be asked"))
    found, source = gpus.find_gpus({"LOCALQ_SIMULATE_GPUS": "2"})
    assert source == "simulated"
    assert found == [Gpu(0, "simulated", 8 * GIB, simulated=True), Gpu(1, "simulated", 8 * GIB, simulated=True)]
    assert gpus.discover({"LOCALQ_SIMULATE_GPUS": "3:512MiB"}) == [
        Gpu(i, "simulated", 512 * MIB, simulated=True) for i in range(3)]
    assert gpus.find_gpus({"LOCALQ_SIMULATE_GPUS": "0"}) == ([], "simulated")  # no GPUs, whatever is there


@pytest.mark.parametrize("value", ["two", "-1", "2:lots", "2:0", ":8GiB"])
def test_bad_simulate_value_is_an_error_naming_the_variable(value):
    with pytest.raises(ValueError, match="LOCALQ_SIMULATE_GPUS"):
        gpus.find_gpus({"LOCALQ_SIMULATE_GPUS": value})


@pytest.mark.parametrize("text, size", [
    ("1024", 1024), ("8GiB", 8 * GIB), ("8G", 8 * GIB), ("8gb", 8 * 10**9), ("1.5GiB", int(1.5 * GIB)),
    ("512M", 512 * MIB), ("512 MiB", 512 * MIB), ("2TB", 2 * 10**12), ("64k", 65536), (4096, 4096),
])
def test_parse_size(text, size):
    assert gpus.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "8 parsecs", "-1G", "0", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        gpus.parse_size(text)


def test_format_size():
    assert [gpus.format_size(size) for size in (None, 0, 512, 1536 * MIB, 80 * GIB)] == [
        "-", "0 B", "512 B", "1.5 GiB", "80.0 GiB"]


# --- --gpus selection ------------------------------------------------------------------------

FOUND = [Gpu(0, "A", 16 * GIB), Gpu(1, "B", 16 * GIB), Gpu(2, "C", 16 * GIB)]


def test_select_all_none_and_indexes():
    assert gpus.select_gpus("all", FOUND) == FOUND
    assert gpus.select_gpus("none", FOUND) == []
    assert gpus.select_gpus("2,0", FOUND) == [FOUND[2], FOUND[0]]
    assert gpus.select_gpus("all", []) == []  # no GPUs is not an error for `all`


def test_selecting_a_gpu_that_is_not_there_is_an_error():
    with pytest.raises(GpuSelectionError, match=r"no GPU 3, 7 on this machine \(GPUs found: 0, 1, 2\)"):
        gpus.select_gpus("0,3,7", FOUND)
    with pytest.raises(GpuSelectionError, match=r"GPUs found: none"):
        gpus.select_gpus("0", [])


@pytest.mark.parametrize("text", ["0,x", "-1", "gpu0", "", "0,,1"])
def test_malformed_gpu_specs(text):
    with pytest.raises(GpuSelectionError):
        gpus.parse_gpu_spec(text)


def test_cuda_visible_devices_of_the_launcher_limits_real_gpus_only():
    assert gpus.visible_indexes({}) is None
    assert gpus.visible_indexes({"CUDA_VISIBLE_DEVICES": "2, 0"}) == {0, 2}
    assert gpus.visible_indexes({"CUDA_VISIBLE_DEVICES": ""}) == set()
    with pytest.raises(GpuSelectionError, match="choose GPUs with --gpus"):
        gpus.visible_indexes({"CUDA_VISIBLE_DEVICES": "GPU-8d3a0c1e-aaaa"})
    assert gpus.select_gpus("all", FOUND, visible={1}) == [FOUND[1]]
    with pytest.raises(GpuSelectionError, match="hidden by CUDA_VISIBLE_DEVICES"):
        gpus.select_gpus("0", FOUND, visible={1})
    simulated = gpus.simulated_gpus("2")
    assert gpus.select_gpus("all", simulated, visible=set()) == simulated


def test_the_cli_reports_gpu_selection_errors(monkeypatch, capsys):
    monkeypatch.setenv("LOCALQ_SIMULATE_GPUS", "2")
    assert main(["worker", "--gpus", "0,5"]) == 2
    assert "no GPU 5 on this machine (GPUs found: 0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["worker", "--gpus", "first"])
    assert "expected all, none, or GPU indexes" in capsys.readouterr().err
    monkeypatch.setenv("LOCALQ_SIMULATE_GPUS", "0")
    assert main(["worker", "--cpu", "0"]) == 2
    assert "no workers to run" in capsys.readouterr().err


# --- where models run ------------------------------------------------------------------------


def _config(device="gpu", gpu_layers=None):
    from workers.config import ModelConfig

    return ModelConfig(name="m", source=Path("m.yaml"), created=0, model_file=None, device=device,
                       gpu_layers=gpu_layers)


def test_devices_gpu_models_on_a_real_gpu_worker():
    from workers import devices

    assert devices.torch_device(_config(), {}) == "cuda"
    assert devices.uses_gpu(_config(), {"LOCALQ_SIMULATED_GPU": "0"})
    assert devices.gpu_layers(_config(), {}) == -1  # every layer, unless the config says how many
    assert devices.gpu_layers(_config(gpu_layers=20), {}) == 20
    assert devices.gpu_layers(_config(gpu_layers=0), {}) == 0


def test_devices_simulated_gpu_and_cpu_models_run_on_the_cpu():
    from workers import devices

    simulated = {"LOCALQ_SIMULATED_GPU": "1"}
    assert devices.torch_device(_config(), simulated) == "cpu"
    assert devices.gpu_layers(_config(gpu_layers=20), simulated) == 0
    assert not devices.uses_gpu(_config(), simulated)
    assert devices.torch_device(_config("cpu"), {}) == "cpu"
    assert devices.gpu_layers(_config("cpu", gpu_layers=20), {}) == 0


def test_backends_ask_workers_devices(monkeypatch):
    """Each backend's device choice goes through workers.devices (checked on the source: loading
    the libraries is the backends' own tests' business)."""
    root = Path(__file__).resolve().parent.parent / "workers" / "backends"
    expected = {
        "llama_cpp.py": "devices.gpu_layers(config)",
        "sentence_transformers.py": "devices.torch_device(config)",
        "whisper.py": "devices.uses_gpu(config)",
        "piper.py": "devices.uses_gpu(self.config)",
        "diffusers.py": "devices.uses_gpu(config)",
    }
    for name, call in expected.items():
        source = (root / name).read_text()
        assert call in source, name
        assert 'device == "gpu"' not in source, name
