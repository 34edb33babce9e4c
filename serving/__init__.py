"""Serving a visual memory over HTTP: ``vmem serve --memory M`` (vmem/serve.py).

* `live`: the version being served, swapped for a newer one when any writer publishes (no restart);
* `edits`: the re-vote of a query's neighbours with entry weights changed by a person, and publishing
  those changes as an entry-weights version (the library's `publish_entry_weights`, as ``vmem prune``);
* `schemas`: the typed request and response bodies (the OpenAPI schema is generated from them);
* `app`: the FastAPI application (classify, info, health, thumbnails, the page, apply and undo), its
  errors, limits and per-request logs;
* `server`: the settings and the uvicorn runner (workers, graceful shutdown);
* ``static/``: the one page (HTML, CSS, script; no external assets).

Classification goes through `memory.visual_memory.VisualMemory` and `memory.decide`, the engine every other
caller uses; nothing here searches or votes by itself.
"""
