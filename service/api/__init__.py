"""HTTP routes: OpenAI, text-embeddings-inference, KServe v2 / Open Inference Protocol, ops."""
