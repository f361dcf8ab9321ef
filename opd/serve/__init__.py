"""Serving and reaching models over HTTP: the ``opd`` teacher server and the clients of servers.

* :mod:`opd.serve.client` — :class:`ServiceClient`: JSON over HTTP with bounded retries and
  back-off; a server that stays down or answers garbage becomes one
  :class:`~opd.errors.ServiceError` naming it.
* :mod:`opd.serve.payload` — the ``opd`` scoring protocol's wire format (base64 int32 / fp16 /
  fp32 arrays in JSON).
* :mod:`opd.serve.scoring` — what the server computes (sampled-token, top-k and caller-chosen-id
  log-probs of a causal LM).
* :mod:`opd.serve.batcher` — concurrent requests merged into shared forward passes.
* :mod:`opd.serve.app` — the FastAPI app; :mod:`opd.serve.run` starts it with uvicorn
  (``opd serve-teacher``).

Nothing here is imported by the training loop unless a server is configured.
"""
