"""Where the shared real assets live (../shared beside the project); tests skip with a reason when absent."""

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "models" / "bart-tokenizer"
STORIES_DIR = SHARED / "models" / "stories260k-hf"
DATA_DIR = SHARED / "data"
