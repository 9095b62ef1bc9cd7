"""Names and defaults that the API, the batch checks, the capability checks and the media handlers
share, in a module that imports nothing (so none of them has to import another for a constant)."""

DEFAULT_IMAGE_MODEL = "dall-e-2"  # OpenAI's default when an image request names no model
EXTENSIONS = "x-localai-extensions"  # the request field holding localq's own knobs
#: Extension knobs every backend honours (they steer the queue, not the model).
SCHEDULING_EXTENSIONS = frozenset({"priority", "timeout"})
