"""bf16 only where the hardware computes it fast: the CPU dtype choice on an AVX2-only and on an AMX CPU.

Only the capability query (:func:`kalm_st.precision.cpu_isa`) is replaced to play a CPU kind; the real query is
checked against torch's own capability switch (``ATEN_CPU_CAPABILITY``) in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from kalm_st import precision
from kalm_st.recipe.build import training_arguments
from kalm_st.recipe.config import ConfigError, load_config

from .recipe.conftest import CONFIG_DIR


@pytest.fixture
def cpu_kind(monkeypatch: pytest.MonkeyPatch):
    """Play a CPU kind: replace the capability query only, and forget the cached decision before and after."""

    def play(isa: str) -> None:
        monkeypatch.setattr(precision, "cpu_isa", lambda: isa)
        precision.cpu_bf16_is_fast.cache_clear()

    yield play
    precision.cpu_bf16_is_fast.cache_clear()


@pytest.mark.parametrize(("isa", "fast"), [("AVX2", False), ("AVX512", False), ("AMX", True), ("AVX512_BF16", True)])
def test_auto_picks_bf16_only_on_cpus_with_bf16_in_hardware(cpu_kind, isa: str, fast: bool) -> None:
    cpu_kind(isa)
    assert precision.cpu_bf16_is_fast() is fast
    assert precision.use_bf16("auto", cuda=False) is fast
    assert precision.cpu_autocast("auto").fast_dtype is not None
    assert precision.cpu_autocast("auto")._enabled is fast  # torch.autocast's own flag
    assert precision.use_bf16(False, cuda=False) is False


def test_explicit_bf16_is_honoured_with_a_warning_where_slow(cpu_kind, caplog: pytest.LogCaptureFixture) -> None:
    cpu_kind("AVX2")
    with caplog.at_level(logging.WARNING, logger="kalm_st.precision"):
        assert precision.use_bf16(True, cuda=False, what="args.bf16") is True
    assert "args.bf16=true on a CPU without fast bf16 (capability AVX2)" in caplog.text
    caplog.clear()
    cpu_kind("AMX")
    with caplog.at_level(logging.WARNING, logger="kalm_st.precision"):
        assert precision.use_bf16(True, cuda=False) is True
    assert caplog.text == ""


def test_the_choice_is_logged_once(cpu_kind, caplog: pytest.LogCaptureFixture) -> None:
    cpu_kind("AVX2")
    with caplog.at_level(logging.INFO, logger="kalm_st.precision"):
        precision.use_bf16("auto", cuda=False)
        precision.use_bf16("auto", cuda=False)
    assert caplog.text.count("bf16 on this CPU: slow, 'auto' uses fp32 (CPU capability AVX2") == 1


def test_unknown_isa_falls_back_to_the_micro_benchmark(cpu_kind, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_kind("SVE256")
    calls = []
    monkeypatch.setattr(precision, "_bf16_matmul_is_faster", lambda: calls.append(1) or True)
    assert precision.cpu_bf16_is_fast() is True and precision.cpu_bf16_is_fast() is True
    assert calls == [1]  # measured once per process


def test_bad_setting_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"args\.bf16 must be true, false or 'auto', got 'yes'"):
        precision.use_bf16("yes", what="args.bf16")


def test_real_capability_query_follows_torchs_switch() -> None:
    """The emulation variables of ENVIRONMENT.md make any x86 CPU answer AVX2 and choose fp32."""
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
    script = (
        "import json, torch\nfrom kalm_st import precision\n"
        "print(json.dumps([torch.backends.cpu.get_cpu_capability(), precision.cpu_isa(), precision.cpu_bf16_is_fast()]))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    torch_capability, isa, fast = json.loads(result.stdout.strip().splitlines()[-1])
    if torch_capability != "AVX2":  # a non-x86 CPU ignores the x86 switch
        pytest.skip(f"ATEN_CPU_CAPABILITY=avx2 has no effect on this CPU ({torch_capability})")
    assert isa == "AVX2" and fast is False


@pytest.mark.parametrize(("isa", "expected"), [("AVX2", False), ("AMX", True)])
def test_stage_args_bf16_auto_resolves_per_cpu(cpu_kind, isa: str, expected: bool, tmp_path) -> None:
    cpu_kind(isa)
    config = load_config(
        CONFIG_DIR / "quickstart" / "stage1_pretrain.yaml", overrides=[f"output_dir={tmp_path / 'out'}"]
    )
    assert config.args["bf16"] == "auto" and config.args["use_cpu"] is True
    assert training_arguments(config).bf16 is expected


def test_stage_args_bf16_bad_value_is_a_config_error(tmp_path) -> None:
    with pytest.raises(
        ConfigError, match=r"stage1_pretrain\.yaml.*: args\.bf16 must be true, false or 'auto', got 'sometimes'"
    ):
        load_config(CONFIG_DIR / "quickstart" / "stage1_pretrain.yaml", overrides=["args.bf16=sometimes"])
