"""The llama.cpp backend: the only package that imports `llama_cpp`, one module per idea.

- `core`: library init and logging, model loading, context parameters, the one batch writer
- `runner`: `LlamaCppBackend`, the engine's Runner and Tokenizer
- `embedder`: `LlamaCppEmbedder`, pooled embeddings from a second context on the same weights
- `scorer`: `LlamaCppScorer`, window logits and decode timing for evaluate / compress / plan
- `imatrix`: `ImatrixCollector`, the eval callback that sums activations for an imatrix
- `quantize`: `quantize_file`, llama.cpp's quantizer
- `json_schema`: JSON schema to GBNF; `samplers`: sampler chains
- `grammar` / `grammar_worker`: grammar sampling in sandbox processes

Build these through `edgellm.backends` (`load_backend`, `load_scorer`, ...), which imports them
only when called. This file imports nothing: the grammar sandbox starts as
`python -m edgellm.backends.llama_cpp.grammar_worker` and must lower its priority first.
"""
