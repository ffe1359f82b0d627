import sys
from pathlib import Path

import pytest
import torch

from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.models.loader import load_model

# test helpers (random HF models) live beside the tests; importlib import mode doesn't put this folder on sys.path
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def model(model_dir: Path) -> LlamaForCausalLM:
    """The requesting module's random model (from its own `model_dir` fixture), loaded once on CPU in fp32."""
    return load_model(str(model_dir), torch.device("cpu"), torch.float32)
