"""bench.memory at the tiny shape: one JSON object of per-device figures; the KV cache is a
donated argument and output of the cycle (never a temporary); tensor parallel splits the weights
per device; bad sizes are one-line usage errors."""
from __future__ import annotations

import json

import pytest

from bench import memory


def test_bench_memory_json_per_device_and_donated_cache(capsys):
    memory.main(["--shape", "tiny", "--prompt-len", "200", "--max-new-tokens", "16",
                 "--batch", "2", "--json"])
    one = json.loads(capsys.readouterr().out)
    assert {"prefill_temp_bytes", "cycle_temp_bytes", "kv_cache_bytes", "peak_bytes"} <= set(one)
    cycle = one["programs"]["cycle"]
    # k and v [layers 2, rows 2, positions, kv heads 1, head_dim 32] fp32 (positions: prompt
    # bucket 256 + output bucket 64 + K 8 + 1): donated to the cycle, updated in place
    kv = 2 * 2 * 2 * (256 + 64 + 8 + 1) * 1 * 32 * 4
    assert cycle["alias_bytes"] >= kv and cycle["output_bytes"] >= kv, one
    assert one["kv_cache_bytes"] == cycle["alias_bytes"]
    assert one["prefill_temp_bytes"] == one["programs"]["prefill"]["temp_bytes"] > 0
    tp = memory.measure("tiny", 200, batch=2, max_new_tokens=16, tensor=2, data=2)
    assert tp["devices"] == 4 and tp["programs"]["cycle"]["argument_bytes"] \
        < 0.75 * cycle["argument_bytes"], (tp, one)   # weights and cache split per device
    assert tp["kv_cache_bytes"] < 0.55 * one["kv_cache_bytes"]  # rows over data (1 KV head)


def test_bench_memory_16_bit_on_cpu_keeps_weight_conversion_in_the_loop():
    assert memory.compiler_options("bfloat16") == memory.CPU_16BIT_OPTIONS
    assert memory.compiler_options("float32") == {}


@pytest.mark.parametrize("argv,needle", [
    (["--batch", "3", "--data-parallel-size", "2"], "--batch 3 must be a multiple of"),
    (["--tensor-parallel-size", "4"], "must be divisible by tensor parallel size (4)"),
    (["--prompt-len", "5000"], "exceeds tiny's max_position_embeddings 4096"),
])
def test_bench_memory_bad_sizes_one_line(capsys, argv, needle):
    base = {"--prompt-len": "64", "--batch": "2"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as exit_:
        memory.main(["--shape", "tiny", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_bench_memory_make_data_insert_keeps_the_cache_split():
    """make_data's decode (the engine, AR) on tensor 2 x data 2: each device holds half the
    slots' cache (1 KV head: replicated over tensor), donated to both programs, and inserting a
    prompt into one slot never gathers the whole cache (2x the per-device cache) onto a
    device."""
    res = memory.measure("tiny", 64, batch=8, max_new_tokens=2000, program="make-data",
                         tensor=2, data=2)
    # k and v [layers 2, slots 8 / data 2, positions 3072 (bucket of 2064), 1, 32] fp32
    kv = 2 * 2 * 4 * 3072 * 1 * 32 * 4
    assert kv <= res["kv_cache_bytes"] < 1.01 * kv, res
    for name in ("insert", "generate"):
        assert res["programs"][name]["alias_bytes"] >= kv, res
    assert res["insert_temp_bytes"] < kv, res
