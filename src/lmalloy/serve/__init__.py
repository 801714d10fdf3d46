"""`lmalloy serve`: an OpenAI-compatible HTTP server over a model folder or a proxy-tuned
ensemble, with continuous batching and optional exact speculative decoding.

lmalloy.serve.config (the command's config, pydantic only), .engine (the model thread and its
continuous batching), .api (OpenAI request validation, errors and response bodies), .app
(the Starlette app, uvicorn, the command). Importing this package is light.
"""
