"""The route paths that more than the route's own module needs to know: the door (which routes it may
shed), access control (which stay open), the access log (which are probes), and the metrics (which
series exist from start-up). One home, so that adding a route means one edit here."""

from __future__ import annotations

OPENAI_EMBEDDINGS = "/v1/embeddings"
TEI_EMBED = "/embed"
TEI_PREDICT = "/predict"
TEI_TOKENIZE = "/tokenize"
TEI_DECODE = "/decode"
TEI_HEALTH = "/health"
KSERVE_LIVE = "/v2/health/live"
KSERVE_READY = "/v2/health/ready"
KSERVE_INFER = "/v2/models/{model}/infer"
KSERVE_VERSION_INFER = "/v2/models/{model}/versions/{version}/infer"
METRICS = "/metrics"
REPOSITORY_PREFIX = "/v2/repository"  # the model repository routes, behind the admin key

# Routes whose model is named in the JSON body ("model", or the default model when absent), with its
# inputs under "input", "inputs" or "ids" (/decode): the door reads those fields to shed them. /tokenize
# and /decode do no inference, but tokenizing (or decoding) a large request costs a core as inference does.
BODY_NAMED = frozenset({OPENAI_EMBEDDINGS, TEI_EMBED, TEI_PREDICT, TEI_TOKENIZE, TEI_DECODE})
# Inference routes whose request series exist per model from start-up (the others appear when used).
INFERENCE = (OPENAI_EMBEDDINGS, TEI_EMBED, TEI_PREDICT, KSERVE_INFER, KSERVE_VERSION_INFER)
# Probes and scrapes: machines asking every few seconds, kept out of the access log.
PROBES = frozenset({TEI_HEALTH, KSERVE_LIVE, KSERVE_READY, METRICS})
# What stays open without an API key (unless BERTSERVE_OPEN_HEALTH_AND_METRICS=false): the probes, and
# the schema and docs, which describe the API and do not run it.
OPEN_WITHOUT_KEY = PROBES | {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
