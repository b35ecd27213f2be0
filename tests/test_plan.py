"""`edgellm plan`: the memory arithmetic by hand, the catalog, and the CLI as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import pytest

from edgellm.errors import ValidationError
from edgellm.plan.arch import NOMINAL_BPW, from_gguf, known_size, known_sizes
from edgellm.plan.catalog import Device, find_device, load_catalog
from edgellm.plan.estimate import (
    Efficiency,
    Workload,
    calibrate,
    estimate,
    largest_ctx,
    recommend,
)
from tests.conftest import EDGELLM

GIB = 2**30
LAB = Device(
    key="lab", name="lab", kind="gpu", memory_gib=24, usable_fraction=1.0, bandwidth_gbs=100,
    f16_tflops=50, int8_tops=100, power_w=0, source="test",
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kv_per_token"),
    [
        ("smollm2-135m-instruct", 30 * 2 * 3 * 64 * 2),  # 23,040 B
        ("deepseek-r1-distill-qwen-1.5b", 28 * 2 * 2 * 128 * 2),  # 28,672 B
        ("deepseek-r1-distill-qwen-7b", 28 * 2 * 4 * 128 * 2),  # 57,344 B
        ("deepseek-r1-distill-llama-8b", 32 * 2 * 8 * 128 * 2),  # 131,072 B
    ],
)
def test_kv_bytes_per_token_is_layers_x_2_x_kv_heads_x_head_dim_x_bytes(
    name: str, kv_per_token: int
) -> None:
    arch = known_size(name)
    assert arch.kv_bytes_per_token("f16") == kv_per_token
    assert arch.kv_bytes_per_token("q8_0") == kv_per_token / 2 * 34 / 32
    assert arch.kv_bytes_per_token("q4_0") == kv_per_token / 2 * 18 / 32


def test_known_sizes_parameters_follow_from_their_shapes() -> None:
    for arch in known_sizes().values():
        e, kv_dim, q_dim = arch.embd, arch.kv_heads * arch.head_dim, arch.heads * arch.head_dim
        ffn = {"smollm2-135m-instruct": 1536}.get(arch.name)
        bias = 0 if arch.name.startswith(("smollm2", "deepseek-r1-distill-llama")) else 1
        # attention q, k, v, o (+ q/k/v biases in qwen2), gate/up/down, two norms per layer
        per_layer_without_ffn = 2 * e * q_dim + 2 * e * kv_dim + bias * (q_dim + 2 * kv_dim) + 2 * e
        embeddings = arch.vocab * e * (1 if arch.tied else 2) + e
        ffn_params = (arch.params - embeddings) // arch.layers - per_layer_without_ffn
        assert ffn_params % (3 * e) == 0, arch.name  # gate, up and down are e x ffn each
        if ffn is not None:
            assert ffn_params == 3 * e * ffn


def test_the_default_gguf_reads_as_its_known_size(model_path: Path) -> None:
    arch, tensor_bytes, kind = from_gguf(model_path)
    known = known_size("smollm2-135m-instruct")
    assert (arch.layers, arch.embd, arch.heads, arch.kv_heads, arch.head_dim) == (30, 576, 9, 3, 64)
    assert (arch.vocab, arch.params, arch.tied) == (known.vocab, known.params, True)
    assert kind == "Q4_1"
    assert tensor_bytes < model_path.stat().st_size  # the rest is metadata


def test_memory_of_7b_by_hand() -> None:
    arch = known_size("deepseek-r1-distill-qwen-7b")
    load = Workload(ctx=4096, concurrency=2, cache_type="f16")
    weights = arch.params * NOMINAL_BPW["Q8_0"] / 8
    e = estimate(arch, LAB, "Q8_0", weights, False, load, Efficiency(1.0, 1.0, 1.0, "test"))
    assert e.kv_bytes == 4096 * 2 * 57344 == 0.4375 * GIB
    assert e.overhead_bytes == 512 * 2**20 + 512 * (152064 + 16 * 3584) * 4
    assert e.total_bytes == weights + e.kv_bytes + e.overhead_bytes
    assert e.fits  # 8.1 + 0.44 + 0.9 GiB < 24 GiB
    # decode: untied, so the embedding table (152064 x 3584) is not streamed per token
    streamed = weights * (arch.params - 152064 * 3584) / arch.params
    kv_read = 57344 * 2048
    flops = 2 * (arch.params - 152064 * 3584)
    assert e.decode_tps == pytest.approx(1 / ((streamed + kv_read) / 100e9 + flops / 100e12))
    step = (streamed + 2 * kv_read) / 100e9 + 2 * flops / 100e12
    assert e.aggregate_tps == pytest.approx(2 / step)
    assert e.prefill_tps == pytest.approx(100e12 / flops)


def test_calibration_reproduces_the_measured_speeds() -> None:
    arch = known_size("deepseek-r1-distill-qwen-1.5b")
    load, weights = Workload(128, 1, "f16"), 1.9e9
    eff = calibrate(
        arch, LAB, "Q8_0", weights, load, decode_tps=30.0, prefill_tps=900.0, source="x"
    )
    e = estimate(arch, LAB, "Q8_0", weights, True, load, eff)
    assert e.decode_tps == pytest.approx(30.0) and e.prefill_tps == pytest.approx(900.0)
    assert 0 < eff.decode < 1 and 0 < eff.prefill < 1


def test_recommendation_and_largest_context() -> None:
    arch = known_size("deepseek-r1-distill-qwen-7b")
    small = Device(
        key="s", name="s", kind="gpu", memory_gib=8, usable_fraction=1.0, bandwidth_gbs=100,
        f16_tflops=50, int8_tops=100, power_w=0, source="test",
    )  # fmt: skip
    load = Workload(8192, 1, "f16")
    rows = [
        estimate(arch, small, t, arch.params * NOMINAL_BPW[t] / 8, False, load,
                 Efficiency(1, 1, 1, "t"))
        for t in ("F16", "Q8_0", "Q6_K", "Q4_K_M")
    ]  # fmt: skip
    chosen = recommend(rows, small)
    assert chosen is not None and chosen.qtype == "Q6_K"  # Q8_0: 8.9 GiB > 90% of 8 GiB
    free = 8 * GIB * 0.9 - chosen.weights_bytes - chosen.overhead_bytes
    assert largest_ctx(arch, small, chosen, load) == int(free // 57344)
    assert recommend(rows[:1], small) is None


def test_catalog_has_the_devices_the_issue_names() -> None:
    catalog = load_catalog()
    for key in (
        "rpi5-8gb", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb",
        "jetson-agx-orin-64gb", "x86-2ch-ddr5", "x86-8ch-ddr5", "apple-m2-16gb", "rtx-4090",
        "l4", "a100-40gb", "a100-80gb", "h100-80gb", "h200",
    ):  # fmt: skip
        device = catalog[key]
        assert device.bandwidth_gbs > 0 and device.f16_tflops > 0 and device.source
    assert catalog["h100-80gb"].bandwidth_gbs == 3350
    with pytest.raises(ValidationError, match="did you mean jetson-orin-nano-8gb") as info:
        find_device(catalog, "jetson-orin-nano")
    assert info.value.param == "device"


def test_a_user_catalog_extends_and_overrides(tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text(
        '[devices.box]\nname = "my box"\nkind = "cpu"\nmemory_gib = 32\nusable_fraction = 0.9\n'
        'bandwidth_gbs = 50\nf16_tflops = 1\nint8_tops = 2\npower_w = 65\nsource = "me"\n'
        '[devices.l4]\nname = "L4, measured"\nkind = "gpu"\nmemory_gib = 24\n'
        "usable_fraction = 0.9\nbandwidth_gbs = 250\nf16_tflops = 100\nint8_tops = 200\n"
        'power_w = 72\nsource = "me"\n'
    )
    catalog = load_catalog(mine)
    assert catalog["box"].memory_gib == 32 and catalog["l4"].bandwidth_gbs == 250
    assert "h200" in catalog
    mine.write_text('[devices.bad]\nname = "x"\nkind = "fpga"\n')
    with pytest.raises(ValidationError, match="device 'bad'"):
        load_catalog(mine)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGELLM, "plan", *args], capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_bad_input_is_said_plainly() -> None:
    line = error_line(cli("deepseek-r1-distill-qwen-7b", "--device", "orin-nano"))
    assert "unknown device 'orin-nano'" in line and "jetson-orin-nano-8gb" in line
    line = error_line(cli("deepseek-r1-distill-qwen-8b", "--device", "l4"))
    assert "not a known size" in line and "deepseek-r1-distill-llama-8b" in line
    result = cli("deepseek-r1-distill-qwen-7b", "--device", "jetson-orin-nano-8gb",
                 "--ctx", "131072", "--concurrency", "4")  # fmt: skip
    line = error_line(result)
    assert "nothing fits" in line and "KV cache alone 28.0 GiB" in line
    assert "F16" in result.stdout  # the table is still shown
    assert "--device NAME or --here" in error_line(cli("deepseek-r1-distill-qwen-7b"))
    assert "give a GGUF file" in error_line(cli("deepseek-r1-distill-qwen-7b", "--here"))
    assert "unknown type" in error_line(cli("deepseek-r1-distill-qwen-7b", "--device", "l4",
                                            "--type", "Q9"))  # fmt: skip


def test_plan_a_known_size_as_json() -> None:
    result = cli("deepseek-r1-distill-qwen-1.5b", "--device", "jetson-orin-nano-8gb",
                 "--ctx", "8192", "--concurrency", "4", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["model"]["kv_bytes_per_token"] == 28672
    rows = {r["qtype"]: r for r in body["estimates"]}
    assert rows["Q8_0"]["kv_bytes"] == 8192 * 4 * 28672
    assert body["recommended"] == "F16"  # 3.3 + 0.9 + 0.9 GiB fit 6 GiB with headroom
    assert rows["Q4_K_M"]["decode_tps"] > rows["Q8_0"]["decode_tps"] > rows["F16"]["decode_tps"]
    assert body["largest_concurrency"] >= 4


def test_plan_a_gguf_here_measures_and_calibrates(model_path: Path, tmp_path: Path) -> None:
    cal, png = tmp_path / "cal.json", tmp_path / "plan.png"
    result = cli(str(model_path), "--here", "--ctx", "1024", "--threads", "2", "--json",
                 "--save-calibration", str(cal), "--plot", str(png))  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    rows = {r["qtype"]: r for r in body["estimates"]}
    assert all(r["weights_exact"] for r in rows.values())  # llama.cpp's dry runs
    assert (
        rows["F16"]["weights_bytes"] > rows["Q8_0"]["weights_bytes"] > rows["Q2_K"]["weights_bytes"]
    )
    measured = body["measured"]
    assert measured["type"] == "Q4_1"
    for what in ("decode", "prefill"):
        assert measured[what]["measured_tps"] > 0 and measured[what]["efficiency"] > 0
    saved = json.loads(cal.read_text())
    assert saved["calibrated_with"]["type"] == "Q4_1"
    assert saved["efficiency"]["decode"] == measured["decode"]["efficiency"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    again = cli(str(model_path), "--device", "rpi5-8gb", "--calibration", str(cal), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["efficiency"]["source"] == str(cal)


def test_dry_run_weights_match_a_real_quantization(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.Q8_0.gguf"
    made = subprocess.run([*EDGELLM, "quantize", str(model_path), "-t", "Q8_0", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr
    result = cli(str(model_path), "--device", "rpi5-8gb", "--type", "Q8_0", "--json")
    planned = json.loads(result.stdout)["estimates"][0]["weights_bytes"]
    actual = sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors)
    assert abs(planned - actual) < 0.01 * 2**20  # the dry run reports MiB to 2 decimals
