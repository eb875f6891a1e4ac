import pytest

from pipeline.train import loop


class FakeGpu:
    pass


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(requested):
    assert loop.resolve_precision(requested, []) == requested


def test_auto_on_cpus_follows_bf16_units(monkeypatch):
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: True)
    assert loop.resolve_precision("auto", []) == "bf16"
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: False)
    assert loop.resolve_precision("auto", []) == "fp32"


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_gpus_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(loop.tf.config.experimental, "get_device_details",
                        lambda device: {"compute_capability": capability})
    assert loop.resolve_precision("auto", [FakeGpu()]) == expected


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f amx_bf16 amx_tile\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert loop.cpu_has_bf16_units()
    cpuinfo.write_text("processor : 0\nflags : fpu avx avx2 fma\n")
    assert not loop.cpu_has_bf16_units()
