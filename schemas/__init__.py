"""The request/response contract: OpenAI's spec plus our overlay, generated into marshmallow schemas."""
