import sys
from pathlib import Path

# the fake engine used by the unit tests lives beside them; importlib import mode doesn't put this folder on sys.path
sys.path.insert(0, str(Path(__file__).parent))
