"""The README's Python example runs as written, on the CPU with the tiny model in place of the official files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cosmos_edge.runtime.files import CheckpointFiles

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    section = README.read_text().split("### From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "README: no python block under 'From Python'"
    return match.group(1)


def test_the_readme_python_example_runs(tiny_assets: dict[str, CheckpointFiles]) -> None:
    files = tiny_assets["aloha"]
    code = _python_example()
    for official, tiny in {
        "Cosmos-Policy-ALOHA-Predict2-2B.pt": files.checkpoint,
        "tokenizer.pth": files.tokenizer,
        "aloha_dataset_statistics.json": files.stats,
        "aloha_t5.safetensors": files.text_embeddings,
    }.items():
        assert f'"{official}"' in code
        code = code.replace(f'"{official}"', repr(str(tiny)))
    assert 'devices = ["cuda:0"]' in code
    code = code.replace('devices = ["cuda:0"]', 'devices = ["cpu"]')
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    chunk, plan = namespace["chunk"], namespace["plan"]
    assert chunk.actions.shape == (50, 14) and np.isfinite(chunk.actions).all()  # type: ignore[attr-defined]
    assert 0.0 <= chunk.value <= 1.0  # type: ignore[attr-defined]
    assert plan.candidates is not None and len(plan.candidates.values) == 4  # type: ignore[attr-defined]
    assert namespace["source"].precision == "fp32" and namespace["source"].compile_mode is None  # type: ignore[attr-defined]
