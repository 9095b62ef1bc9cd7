"""`POST /v1/images/generations` and `/v1/images/edits`: queued diffusion jobs.

Without `model`, OpenAI's default (`dall-e-2`) is used, which the default config lists as an
alias. `stream: true` relays the partial and completed image events; every image job also reports
step progress on `GET /v1/jobs/{id}/events`. Variations stay 501: a diffusion pipeline has no
honest way to make one without a prompt.
"""

from __future__ import annotations

from api import model_jobs, uploads
from api.sse import typed_frames
from workers.defaults import DEFAULT_IMAGE_MODEL as DEFAULT_MODEL


def create_image(call):
    body = call.body
    return model_jobs.run("image", body, stream=bool(body.get("stream")), frames=typed_frames,
                          model=body.get("model") or DEFAULT_MODEL)


def create_image_edit(call):
    body = call.body
    files = uploads.collect(("image", "mask"), uploads.IMAGE)
    return model_jobs.run("image_edit", body, stream=bool(body.get("stream")), frames=typed_frames, files=files,
                          model=body.get("model") or DEFAULT_MODEL)


HANDLERS = {"createImage": create_image, "createImageEdit": create_image_edit}
