"""The Triton model repository's sources (installed as the package `rerank_model_repository`).

`rerank export` renders CONFIG_TEMPLATE and copies MODEL_FILES into
<output>/<name>/{config.pbtxt, 1/...}; the ONNX graph (or, for the torch and packed runtimes, the checkpoint)
and the tokenizer it writes itself.
Nothing generated is ever stored here.
"""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
CONFIG_TEMPLATE = SOURCE_DIR / "config.pbtxt.template"
# Files copied into the model's version folder, under these names.
MODEL_FILES = {
    name: SOURCE_DIR / name
    for name in ("model.py", "reranker_engine.py", "torch_runner.py", "modernbert_packed.py", "cpu_features.py")
}
