"""HTTP caption service with a web page (``medcap serve``).

One model, one worker: requests are decoded and checked on the event loop (image decoding in a
thread pool), then queued; a single batching worker gathers queued images for a short window (or
until ``max_batch`` images are waiting), groups them by generation options, and runs
``caption_images`` in one dedicated thread, so the model is never called concurrently and a GPU
captions several images for about the price of one.

Endpoints::

    GET  /                 the web page (medcap/static)
    GET  /healthz          liveness: {"status": "ok", ...}; never needs the token
    GET  /v1/model         base model, adapter, resolved config, defaults, limits, medcap version
    GET  /v1/metrics       request/batch counters (batch-size histogram) for load tests, as JSON
    GET  /metrics          the same counters, HTTP requests by endpoint and code and a latency
                           histogram, in Prometheus's text format (prometheus-client); no token
    POST /v1/captions      multipart: one or more ``files`` + generation options as form fields
    GET  /v1/models        OpenAI-compatible: the served model (``--served-model-name``)
    POST /v1/chat/completions  OpenAI-compatible: the caption of one image sent as a base64 data URL
                           in an ``image_url`` part; ``stream: true`` answers in server-sent events
    GET  /openapi.json     the OpenAPI schema
    GET  /docs             Swagger UI for the schema, served from the swagger-ui-bundle package

Every user mistake gets a 4xx JSON body ``{"error": CODE, "detail": MESSAGE, "field": NAME}``:
request too large (413), too many images (400), no or empty file (400), unsupported format (415),
undecodable image (422), too many pixels or too costly to decode (413, from the header: decoded
bytes, progressive-JPEG scans, a deflated DICOM's size), bad or unknown option (422), missing token
(401), a stalled body (408), queue full (503). The OpenAI-compatible routes answer the same refusals
in OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``), so OpenAI clients
raise their usual exceptions with medcap's message. Nothing a user sends is used as a file path: uploaded
file names are only echoed back, sanitised.

Hostile input is bounded, not only refused: large decodes take at most ``max_concurrent_decodes``
threads and all decodes together at most ``decode_budget_bytes`` of estimated memory (small images
have threads of their own and go first); images wait for the model at its input size; a client that
leaves stops its work and is logged as a 499, not an error; connections that do not finish their
headers in ``header_timeout_s`` are closed.

Example::

    medcap serve --checkpoint runs/demo/run/checkpoints/best --port 8000
    curl -F files=@scan.jpg -F files=@ct.dcm -F num_beams=3 http://127.0.0.1:8000/v1/captions

    from openai import OpenAI   # any OpenAI-compatible client
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="TOKEN or anything")
    url = "data:image/jpeg;base64," + base64.b64encode(open("scan.jpg", "rb").read()).decode()
    done = client.chat.completions.create(model=client.models.list().data[0].id, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    print(done.choices[0].message.content)

FastAPI's own /docs page loads Swagger UI's JavaScript from a CDN, which a hospital network or an
offline machine cannot reach; /docs here serves the same Swagger UI from the swagger-ui-bundle
package instead, so the API documentation works offline.

Modules: ``app`` (the FastAPI app and its routes), ``openai_api`` (the OpenAI-compatible routes),
``prometheus`` (``/metrics``), ``batcher`` (the batching worker), ``gate`` (the
decode budget), ``uploads`` (checking and decoding uploads with the one image reader), ``schemas``
(limits, options, bodies, errors), ``loading`` (what to serve), ``server`` (uvicorn with a header
timeout).
"""

from medcap.infer.serve.app import create_app
from medcap.infer.serve.loading import load_for_serving
from medcap.infer.serve.schemas import BatchSettings, ServeError, ServeLimits
from medcap.infer.serve.uploads import sanitize_filename

__all__ = [
    "BatchSettings",
    "ServeError",
    "ServeLimits",
    "create_app",
    "load_for_serving",
    "sanitize_filename",
]
