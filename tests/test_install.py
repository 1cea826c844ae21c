"""A non-editable install finds its configs, adapters and evaluators from any directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_wheel_install_ships_configs(tmp_path: Path) -> None:
    target = tmp_path / "site"
    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-compile", "--target", str(target), str(root)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "mmssl" / "configs" / "modality" / "speech.yaml").exists()
    code = ("import mmssl, mmssl.eval.linear_probe, mmssl.modalities.speech; from mmssl.config import compose;"
            "cfg = compose(['trainer.max_steps=3']); print(mmssl.__file__, cfg.objective.name, cfg.trainer.max_steps)")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path, name, steps = out.stdout.split()
    assert path.startswith(str(target)) and name == "hubert" and steps == "3"
