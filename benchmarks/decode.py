"""Decode benchmark (engine vs transformers): `python benchmarks/decode.py` on a GPU (Llama-2-7B and
Llama-3-8B shapes, random weights), `python benchmarks/decode.py --cpu` on the real SmolLM2.
The logic lives in salience/engine/bench.py (also `salience bench decode`); --help lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from salience.engine.bench import main

if __name__ == "__main__":
    main()
