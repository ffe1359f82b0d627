import sys
from pathlib import Path

# test helpers (random HF models) live beside the tests; importlib import mode doesn't put this folder on sys.path
sys.path.insert(0, str(Path(__file__).parent))
