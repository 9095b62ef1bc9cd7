"""Images in chat requests (workers/image_inputs.py): data URLs, fetched URLs under limits, decoding."""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from workers import image_inputs
from workers.image_inputs import ImageInputError, ImageLimits, load_image

pytestmark = pytest.mark.unit

FETCHING = ImageLimits(fetch_urls=True, fetch_timeout=5)


def encoded(fmt: str = "PNG", size=(3, 2), color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_a_data_url_image_is_decoded_to_rgb(fmt):
    image = load_image(data_url(encoded(fmt)), "messages[0].content[1]", ImageLimits())
    assert (image.width, image.height, len(image.rgb)) == (3, 2, 18)
    if fmt in ("PNG", "BMP"):
        assert image.rgb[:3] == bytes((200, 10, 10))


@pytest.mark.parametrize(("url", "message"), [
    ("data:image/png,abc", "must be base64"),
    ("data:image/png;base64,@@@@", "not valid"),
    (data_url(b"not an image at all"), "cannot be decoded"),
    (data_url(encoded("TIFF")), "format TIFF is not supported"),
    ("ftp://example.com/x.png", r"data: URL or an http\(s\) URL"),
    ("http://example.com/x.png", "not fetched by this server"),
])
def test_images_that_cannot_be_read_are_refused_naming_the_part(url, message):
    with pytest.raises(ImageInputError, match=message) as error:
        load_image(url, "messages[1].content[0]", ImageLimits())
    assert error.value.param == "messages[1].content[0]"


def test_size_and_pixel_limits():
    with pytest.raises(ImageInputError, match="larger than"):
        load_image(data_url(encoded(size=(64, 64))), "p", ImageLimits(max_bytes=100))
    with pytest.raises(ImageInputError, match="more than 100 pixels"):
        load_image(data_url(encoded(size=(20, 20))), "p", ImageLimits(max_pixels=100))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]"])
def test_urls_on_this_machine_or_a_private_network_are_never_fetched(host):
    with pytest.raises(ImageInputError, match="private network|cannot be resolved"):
        load_image(f"http://{host}:6379/x.png", "p", FETCHING)


class _Images(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        routes = {
            "/cat.png": (200, "image/png", encoded()),
            "/page": (200, "text/html", b"<html></html>"),
            "/big.png": (200, "image/png", encoded(size=(300, 300), color=(1, 2, 3)) + b"\0" * 5000),
            "/moved": (302, "image/png", b""),
            "/loop": (302, "image/png", b""),
        }
        status, kind, body = routes.get(self.path, (404, "text/plain", b"no"))
        self.send_response(status)
        if self.path == "/moved":
            self.send_header("location", "/cat.png")
        if self.path == "/loop":
            self.send_header("location", "/loop")
        self.send_header("content-type", kind)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server(monkeypatch):
    # the address check itself is tested above; here loopback stands in for a public host
    monkeypatch.setattr(image_inputs, "_check_host", lambda url, param: None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_fetched_image_follows_redirects_within_limits(image_server):
    assert load_image(f"{image_server}/cat.png", "p", FETCHING).width == 3
    assert load_image(f"{image_server}/moved", "p", FETCHING).width == 3
    with pytest.raises(ImageInputError, match="redirects"):
        load_image(f"{image_server}/loop", "p", FETCHING)
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(f"{image_server}/page", "p", FETCHING)
    with pytest.raises(ImageInputError, match="HTTP 404"):
        load_image(f"{image_server}/none.png", "p", FETCHING)
    with pytest.raises(ImageInputError, match="larger than 2000 bytes"):
        load_image(f"{image_server}/big.png", "p", ImageLimits(fetch_urls=True, max_bytes=2000))


def test_every_redirect_target_is_checked_again(image_server, monkeypatch):
    checked = []
    monkeypatch.setattr(image_inputs, "_check_host", lambda url, param: checked.append(url))
    load_image(f"{image_server}/moved", "p", FETCHING)
    assert checked == [f"{image_server}/moved", f"{image_server}/cat.png"]
