"""`rerank export`: a ModernBertForSequenceClassification checkpoint (one logit) to a Triton model repository.

    <output>/<name>/config.pbtxt          rendered from rerank_triton_model/config.pbtxt.template
    <output>/<name>/1/model.onnx         the graph (dynamic batch and sequence axes), verified against eager;
                                         with int8, its dynamically quantized version (the fp32 graph then
                                         stays as model.fp32.onnx: CPUs without VNNI load it)
    <output>/<name>/1/model/             the fp32 checkpoint: the PyTorch runtimes (torch, packed) cast it to
                                         the served precision at load; CPU models of the dense runtimes
                                         run their long pairs on the packed engine over it
    <output>/<name>/1/model.py           one import: the Python-backend model is the package beside it,
    <output>/<name>/1/rerank_triton_model/   copied from server/rerank_triton_model
    <output>/<name>/1/tokenizer/         the fast tokenizer the frontend loads
    <output>/<name>/1/export.json        provenance: source, versions, verification, the auto choice

By concern: options.py (the flags and their checks), source.py (the checkpoint), weights.py (ONNX, int8,
fp16, checkpoint), verify.py (each runtime against eager), agreement.py (ranking agreement and its bounds),
auto.py (the measured choice), write.py (config.pbtxt, export.json), pipeline.py (the order of it all).
torch, transformers, onnx are imported when an export runs: they are needed to export, never to serve, and
`rerank query` loads the options without them. The model folder is assembled next to its destination and
renamed into place, so a failed export never leaves a half-written model for Triton to load.
"""

from rerank_server.export.options import DEFAULT_MODEL, ExportError, ExportOptions
from rerank_server.export.pipeline import export

__all__ = ["DEFAULT_MODEL", "ExportError", "ExportOptions", "export"]
