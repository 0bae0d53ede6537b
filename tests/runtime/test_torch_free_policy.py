"""The serving path runs without torch: these modules must import and work with torch unavailable."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from cosmos_edge.runtime.policy import images, latents, normalization, text_embeddings
from cosmos_edge.runtime.platforms import platform_spec

platform = platform_spec("libero")
frames = {camera: np.zeros((256, 256, 3), np.uint8) for camera in platform.cameras}
assert images.preprocess_observation_images(platform, frames)["wrist"].shape == (3, 224, 224)
sequence = np.zeros((1, 16, 9, 28, 28), np.float32)
latents.write_proprio(sequence, platform.proprio_slot, np.zeros((1, 9)))
stats = normalization.DatasetStats(actions_min=[0.0], actions_max=[1.0], proprio_min=[0.0], proprio_max=[1.0])
text_embeddings.write(sys.argv[1], {"a": np.ones((1, 4, 8), np.float32)})
assert text_embeddings.read(sys.argv[1]).get("a").sum() == 32
"""


def test_preprocessing_modules_work_without_torch(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "t5.safetensors")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
