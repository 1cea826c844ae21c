"""Smoke test of bench/clip_step.py: the CPU smoke mode runs mmssl and open_clip sides and the loss check
(run once per session by bench/run_all.py, the ``bench_smoke`` fixture)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("open_clip")


def test_clip_bench_smoke(bench_smoke: Path) -> None:
    out = bench_smoke / "clip.json"
    assert out.exists(), (bench_smoke / "run_all.stdout").read_text()[-4000:]
    stdout = (bench_smoke / "clip.log").read_text()
    assert "| mmssl |" in stdout and "| ref |" in stdout and "bench/clip_step.py --device cpu --smoke" in stdout, stdout
    res = json.loads(out.read_text())
    assert res["complete"] and res["settings"]["batch"] == 4 and res["settings"]["text_len"] == 16

    flops = {}
    for side in ("mmssl", "ref"):
        r = res["sides"][side]
        assert "error" not in r, r.get("error")
        assert r["step_s"] and all(math.isfinite(t) and t > 0 for t in r["step_s"]), r["step_s"]
        assert r["pairs_per_s"] == res["settings"]["batch"] / r["step_s_median"]
        assert r["mfu"] == pytest.approx(r["flops"]["total"] / r["step_s_median"] / 989.4e12)
        assert 0 < r["mfu_measured_peak"] < 10  # a ratio, not a percentage; loose: CPU peaks are noisy
        assert any("bmm" in op for op in r["flops"]["by_op"]), r["flops"]["by_op"]  # attention is counted
        flops[side] = r["flops"]["total"]
    # The same matmul shapes on both sides (open_clip's ln_pre and mmssl's mean pooling add no matmuls).
    assert abs(flops["mmssl"] / flops["ref"] - 1) < 0.05, flops
    assert res["ratios"]["mmssl/ref"] == pytest.approx(res["sides"]["mmssl"]["pairs_per_s"]
                                                       / res["sides"]["ref"]["pairs_per_s"])
    assert isinstance(res["target_1p2x_eager"], bool) and res["target_1p2x_compiled"] is None

    m = res["settings"]["models"]
    for key in ("image", "patch", "v_width", "v_layers", "v_heads", "t_width", "t_layers", "t_heads", "context",
                "embed_dim"):
        assert m["reference"][key] == m["mmssl"][key], key
    assert (m["mmssl"]["image"], m["mmssl"]["patch"], m["mmssl"]["v_width"], m["mmssl"]["context"]) == (32, 8, 64, 16)
    assert m["reference"]["text_pool"] == "argmax" and m["mmssl"]["text_pool"] == "mean"

    check = res["check"]
    assert check["status"] == "passed", json.dumps(check, indent=1)[:3000]
    assert check["loss_rel_diff"] < 1e-4
    assert check["image_embed_rel_diff"] < 1e-5 and check["text_embed_rel_diff"] < 1e-5
    assert all(v < 1e-4 for v in check["grad_rel_diff"].values()), check["grad_rel_diff"]
    assert math.isfinite(check["loss_ref"]) and check["loss_ref"] > 0
