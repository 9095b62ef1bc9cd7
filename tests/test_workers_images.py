"""Image jobs on the diffusers backend, end to end through `workers.execute` with a real (tiny,
locally built) Stable Diffusion pipeline: formats, response formats, seeds, progress, streaming,
cancellation, edits (img2img and inpaint) and the capability checks."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from ops.tiny_models import prepare_tiny_diffusion  # noqa: E402
from workers import image_jobs  # noqa: E402
from workers.cache import ModelCache  # noqa: E402
from workers.errors import JobError  # noqa: E402
from workers.execute import execute  # noqa: E402
from workers.files import FileOutput, UploadedFile  # noqa: E402
from workers.registry import ModelRegistry  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EXT = "x-localai-extensions"
STEPS = 4
CONFIG = {
    "name": "tiny-diffusion",
    "backend": "diffusers",
    "device": "cpu",
    "aliases": ["dall-e-2", "gpt-image-1"],
    "parameters": {"model": "tiny-diffusion"},
    "diffusers": {"pipeline_type": "StableDiffusionPipeline", "scheduler_type": "euler_a",
                  "default_size": "64x64", "max_size": 512, "max_images": 4},
    "step": STEPS,
    "cfg_scale": 7.5,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-models")
    prepare_tiny_diffusion(root / "tiny-diffusion")
    (root / "tiny-diffusion.yaml").write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return ModelRegistry.load(root), ModelCache()


@pytest.fixture(scope="module")
def config(models):
    return models[0].resolve("tiny-diffusion")


@pytest.fixture
def run(models):
    registry, cache = models

    def run(kind: str, request: dict, *, model: str = "tiny-diffusion", cancel_after: int | None = None,
            job_id: str = "job-1") -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []

        def cancelled() -> bool:
            steps = sum(1 for event, _ in events if event == "progress")
            return cancel_after is not None and steps >= cancel_after

        job = {"id": job_id, "kind": kind, "model": model, "request": {"model": model, **request}, "created": 123}
        execute(job, lambda event, data: events.append((event, data)), cancelled, registry=registry, cache=cache)
        return events

    return run


def result_of(events) -> dict:
    assert events[-1][0] == "result"
    assert [event for event, _ in events].count("result") == 1
    return events[-1][1]


def picture(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(image: Image.Image, name: str = "in.png") -> UploadedFile:
    return UploadedFile(name, "image/png", png_bytes(image))


def progress_steps(events) -> list[tuple[int, int]]:
    return [(data["step"], data["total_steps"]) for event, data in events if event == "progress"]


# --- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize(("output_format", "pil_format", "size"), [
    ("png", "PNG", "64x64"), ("jpeg", "JPEG", "128x64"), ("webp", "WEBP", "64x128"),
])
def test_every_output_format_decodes_at_the_requested_size(run, output_format, pil_format, size):
    request = {"prompt": "a red fox", "size": size, "output_format": output_format, "response_format": "b64_json"}
    if output_format != "png":
        request["output_compression"] = 80
    result = result_of(run("image", request))
    image = picture(result["data"][0]["b64_json"])
    assert image.format == pil_format
    assert f"{image.width}x{image.height}" == size
    assert result["created"] == 123
    # a dall-e answer (the default model) says nothing about its pictures, as OpenAI's does not
    assert not {"size", "quality", "background", "output_format"} & result.keys()
    described = result_of(run("image", {**request, "model": "gpt-image-1"}))
    assert described["output_format"] == output_format and described["background"] == "opaque"
    assert "size" not in described and "quality" not in described  # not values the schema lists
    usage = result["usage"]
    assert usage["input_tokens_details"]["text_tokens"] == usage["input_tokens"] > 0


def test_auto_size_is_the_config_default_and_native_size_works(run):
    assert picture(result_of(run("image", {"prompt": "x", "size": "auto", "response_format": "b64_json"}))
                   ["data"][0]["b64_json"]).size == (64, 64)
    assert picture(result_of(run("image", {"prompt": "x", "size": "256x256", "response_format": "b64_json"}))
                   ["data"][0]["b64_json"]).size == (256, 256)


def test_url_response_format_leaves_file_outputs(run):
    result = result_of(run("image", {"prompt": "a boat", "n": 2, "response_format": "url", "output_format": "jpeg"}))
    assert len(result["data"]) == 2
    for item in result["data"]:
        assert item.keys() == {"url"}
        output = item["url"]
        assert isinstance(output, FileOutput)
        assert (output.media_type, output.extension) == ("image/jpeg", "jpeg")
        assert Image.open(io.BytesIO(output.data)).size == (64, 64)


def test_default_response_format_follows_the_model_family(run):
    assert "url" in result_of(run("image", {"prompt": "x"}, model="dall-e-2"))["data"][0]
    assert "b64_json" in result_of(run("image", {"prompt": "x"}, model="gpt-image-1"))["data"][0]


def test_same_seed_same_bytes_other_seed_differs(run):
    def generate(seed):
        request = {"prompt": "a lighthouse", "response_format": "b64_json", EXT: {"seed": seed}}
        return result_of(run("image", request))["data"][0]["b64_json"]

    assert generate(7) == generate(7)
    assert generate(7) != generate(8)
    # image i of a batch is seeded with seed + i
    batch = result_of(run("image", {"prompt": "a lighthouse", "n": 2, "response_format": "b64_json",
                                    EXT: {"seed": 7}}))["data"]
    assert batch[0]["b64_json"] != batch[1]["b64_json"]


def test_without_seed_the_job_id_seeds(run):
    def generate(job_id):
        return result_of(run("image", {"prompt": "x", "response_format": "b64_json"}, job_id=job_id))["data"][0]

    assert generate("a") == generate("a")
    assert generate("a") != generate("b")


def test_progress_after_every_step_in_order(run):
    events = run("image", {"prompt": "a tree", EXT: {"steps": 3}})
    assert progress_steps(events) == [(1, 3), (2, 3), (3, 3)]
    assert [event for event, _ in events] == ["progress"] * 3 + ["result"]


def test_stream_sends_partial_images_then_completed_then_result(run):
    events = run("image", {"prompt": "a tree", "stream": True, "partial_images": 2, "output_format": "webp",
                           "response_format": "b64_json"})
    deltas = [data for event, data in events if event == "delta"]
    assert [delta["type"] for delta in deltas] == [
        "image_generation.partial_image", "image_generation.partial_image", "image_generation.completed",
    ]
    assert [delta["partial_image_index"] for delta in deltas[:2]] == [0, 1]
    for delta in deltas:
        expected = {"type", "b64_json", "created_at", "size", "quality", "background", "output_format"}
        expected.add("partial_image_index" if delta["type"].endswith("partial_image") else "usage")
        assert delta.keys() == expected
        assert delta["output_format"] == "webp" and delta["size"] == "auto"  # 64x64 is not a size the schema lists
        assert picture(delta["b64_json"]).size == (64, 64)
    assert deltas[-1]["usage"]["input_tokens"] > 0
    # partial images come at evenly spaced steps, after that step's progress
    kinds = [event if event != "delta" else data["type"].rsplit(".", 1)[1] for event, data in events]
    assert kinds == ["progress", "progress", "partial_image", "progress", "partial_image", "progress",
                     "completed", "result"]
    assert result_of(events)["data"][0]["b64_json"] == deltas[-1]["b64_json"]


def test_cancel_after_first_step_stops_without_result(run):
    events = run("image", {"prompt": "a tree", "n": 2}, cancel_after=1)
    assert progress_steps(events) == [(1, STEPS)]
    assert all(event == "progress" for event, _ in events)


def test_other_schedulers_run(run):
    for name in ("ddim", "k_dpmpp_2m", "dpm_2"):
        events = run("image", {"prompt": "x", "response_format": "b64_json", EXT: {"scheduler": name}})
        assert picture(result_of(events)["data"][0]["b64_json"]).size == (64, 64)
        assert progress_steps(events)[-1][0] == progress_steps(events)[-1][1]


def test_negative_prompt_guidance_and_clip_skip_change_the_picture(run):
    def generate(**knobs):
        request = {"prompt": "a cat", "response_format": "b64_json", EXT: {"seed": 1, **knobs}}
        return result_of(run("image", request))["data"][0]["b64_json"]

    plain = generate()
    assert generate(negative_prompt="a dog") != plain
    assert generate(guidance_scale=1.0) != plain
    assert generate(clip_skip=1) != plain


def test_clip_skip_beyond_the_text_encoder_is_a_400(run):
    with pytest.raises(JobError) as caught:
        run("image", {"prompt": "a cat", EXT: {"clip_skip": 5}})
    assert (caught.value.status, caught.value.param) == (400, f"{EXT}.clip_skip")


def test_too_long_prompt_is_a_400_not_cut_off(run):
    with pytest.raises(JobError) as caught:
        run("image", {"prompt": "word " * 80})
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "prompt", "context_length_exceeded")


# --- edits -----------------------------------------------------------------------------------


def test_edit_uploaded_png_img2img_with_strength(run):
    source = Image.new("RGB", (96, 64), (200, 30, 30))
    request = {"prompt": "add a hat", "image": upload(source), "response_format": "b64_json",
               EXT: {"strength": 0.5, "seed": 3}}
    events = run("image_edit", request)
    # strength 0.5 of 4 steps runs the last 2
    assert progress_steps(events) == [(1, 2), (2, 2)]
    result = result_of(events)
    assert picture(result["data"][0]["b64_json"]).size == (96, 64)  # auto: the input's size
    again = result_of(run("image_edit", request))
    assert again["data"][0]["b64_json"] == result["data"][0]["b64_json"]
    other = result_of(run("image_edit", {**request, "image": upload(Image.new("RGB", (96, 64), (0, 0, 250)))}))
    assert other["data"][0]["b64_json"] != result["data"][0]["b64_json"]


def test_edit_with_mask_inpaints_and_streams_edit_events(run):
    source = Image.new("RGB", (64, 64), (20, 160, 20))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 32))  # transparent = repaint
    events = run("image_edit", {
        "prompt": "a sun", "image": [upload(source)], "mask": upload(mask, "mask.png"), "size": "128x128",
        "stream": True, "partial_images": 1, "response_format": "b64_json", EXT: {"seed": 5},
    })
    deltas = [data for event, data in events if event == "delta"]
    assert [delta["type"] for delta in deltas] == ["image_edit.partial_image", "image_edit.completed"]
    assert len(progress_steps(events)) == STEPS
    assert picture(result_of(events)["data"][0]["b64_json"]).size == (128, 128)


def test_edit_json_body_with_data_urls(run):
    source = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (64, 64), "white"))).decode()
    mask = Image.new("LA", (64, 64), (0, 255))
    mask.paste((0, 0), (16, 16, 48, 48))
    mask_url = "data:image/png;base64," + base64.b64encode(png_bytes(mask)).decode()
    events = run("image_edit", {"prompt": "a dot", "images": [{"image_url": source}], "mask": {"image_url": mask_url},
                                "output_format": "jpeg"})
    result = result_of(events)
    assert result["data"][0].keys() == {"b64_json"}  # the JSON body is gpt-image's: base64 by default
    assert picture(result["data"][0]["b64_json"]).format == "JPEG"


def test_transparent_picture_without_mask_inpaints(run):
    source = Image.new("RGBA", (64, 64), (10, 10, 200, 255))
    source.paste((0, 0, 0, 0), (0, 0, 64, 20))
    clear = result_of(run("image_edit", {"prompt": "sky", "image": upload(source), "response_format": "b64_json",
                                         EXT: {"seed": 2}}))
    opaque = result_of(run("image_edit", {"prompt": "sky", "image": upload(source.convert("RGB")),
                                          "response_format": "b64_json", EXT: {"seed": 2}}))
    assert clear["data"][0]["b64_json"] != opaque["data"][0]["b64_json"]


def test_undecodable_upload_is_a_400(run):
    with pytest.raises(JobError) as caught:
        run("image_edit", {"prompt": "x", "image": UploadedFile("a.png", "image/png", b"\x89PNG not really")})
    assert (caught.value.status, caught.value.param) == (400, "image")


def test_mask_of_another_size_is_a_400(run):
    with pytest.raises(JobError) as caught:
        run("image_edit", {"prompt": "x", "image": upload(Image.new("RGB", (64, 64))),
                           "mask": upload(Image.new("RGBA", (32, 32)))})
    assert (caught.value.status, caught.value.param) == (400, "mask")


def test_mask_without_alpha_is_a_400(run):
    with pytest.raises(JobError) as caught:
        run("image_edit", {"prompt": "x", "image": upload(Image.new("RGB", (64, 64))),
                           "mask": upload(Image.new("RGB", (64, 64)))})
    assert (caught.value.status, caught.value.param) == (400, "mask")


def test_bad_data_url_is_a_400(run):
    with pytest.raises(JobError) as caught:
        run("image_edit", {"prompt": "x", "images": [{"image_url": "data:image/png;base64,aGVsbG8="}]})
    assert (caught.value.status, caught.value.param) == (400, "images[0].image_url")


# --- capability checks -----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "request_", "param"), [
    ("image", {"size": "250x250"}, "size"),
    ("image", {"size": "1024x1024"}, "size"),  # above this config's max_size 512
    ("image", {"size": "32x32"}, "size"),
    ("image", {"size": "big"}, "size"),
    ("image", {"output_format": "gif"}, "output_format"),
    ("image", {EXT: {"scheduler": "warp_drive"}}, f"{EXT}.scheduler"),
    ("image", {"stream": True, "n": 2}, "n"),
    ("image", {"n": 5}, "n"),
    ("image", {"quality": "hd"}, "quality"),
    ("image", {"quality": "high"}, "quality"),
    ("image", {"style": "vivid"}, "style"),
    ("image", {"background": "transparent"}, "background"),
    ("image", {"output_compression": 50}, "output_compression"),
    ("image", {"output_format": "jpeg", "output_compression": 101}, "output_compression"),
    ("image", {"response_format": "svg"}, "response_format"),
    ("image", {"stream": True, "partial_images": 3, EXT: {"steps": 2}}, "partial_images"),
    ("image", {EXT: {"strength": 0.5}}, f"{EXT}.strength"),
    ("image", {EXT: {"mirostat": 2}}, f"{EXT}.mirostat"),
    ("image", {"frobnicate": 1}, "frobnicate"),
    ("image_edit", {"input_fidelity": "high"}, "input_fidelity"),
    ("image_edit", {EXT: {"strength": 0.1, "steps": 4}}, f"{EXT}.strength"),
    ("image_edit", {"image": [UploadedFile("a", "", b""), UploadedFile("b", "", b"")]}, "image"),
    ("image_edit", {"images": [{"image_url": "https://example.com/a.png"}]}, "images[0].image_url"),
    ("image_edit", {"images": [{"file_id": "file-1"}]}, "images[0].file_id"),
    ("image_edit", {"images": [{"image_url": "data:,"}, {"image_url": "data:,"}]}, "images"),
    ("image_edit", {"images": [{"image_url": "data:,"}], "mask": {"image_url": "http://x/m.png"}}, "mask.image_url"),
])
def test_capability_rejections(config, kind, request_, param):
    problem = image_jobs.unsupported(kind, config, {"prompt": "x", **request_})
    assert problem is not None and problem[0] == param, problem
    assert param in problem[1] or param == "frobnicate"


@pytest.mark.parametrize(("kind", "request_"), [
    ("image", {"model": "dall-e-3", "user": "u", "size": "auto", "quality": "auto", "n": 4,
               "background": "opaque", "moderation": "low", "output_format": "png", "output_compression": 100,
               "response_format": "url", "stream": False, "partial_images": 0}),
    ("image", {"quality": "standard", "size": "512x256", "stream": True, "partial_images": 3}),
    ("image", {"output_format": "webp", "output_compression": 0, EXT: {
        "negative_prompt": "n", "steps": 10, "guidance_scale": 3, "scheduler": "k_euler", "clip_skip": 1,
        "seed": -5, "priority": "batch", "timeout": 30}}),
    ("image_edit", {"image": UploadedFile("a", "", b""), "mask": UploadedFile("m", "", b""),
                    "input_fidelity": "low", EXT: {"strength": 0.25}}),
    ("image_edit", {"images": [{"image_url": "data:image/png;base64,AAAA"}], "background": "auto"}),
])
def test_capability_accepts(config, kind, request_):
    assert image_jobs.unsupported(kind, config, {"prompt": "x", **request_}) is None


def test_rejections_surface_as_400_from_execute(run):
    with pytest.raises(JobError) as caught:
        run("image", {"prompt": "x", "size": "250x250"})
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "size", "unsupported_parameter")


def test_enable_parameters_gates_knobs(config):
    from dataclasses import replace

    gated = replace(config, diffusers={**config.diffusers, "enable_parameters": "num_inference_steps"})
    assert image_jobs.unsupported("image", gated, {"prompt": "x", EXT: {"steps": 3}}) is None
    problem = image_jobs.unsupported("image", gated, {"prompt": "x", EXT: {"negative_prompt": "n"}})
    assert problem[0] == f"{EXT}.negative_prompt"


def test_the_check_imports_no_model_library():
    code = (
        "import sys; from pathlib import Path; from workers.registry import ModelRegistry; "
        "from workers import capabilities; "
        "config = ModelRegistry.load(Path('models')).resolve('tiny-diffusion'); "
        "assert capabilities.unsupported('image', config, {'prompt': 'x', 'size': '250x250'})[0] == 'size'; "
        "heavy = {'torch', 'diffusers', 'transformers', 'PIL'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize(("options", "field"), [
    ({"scheduler_type": "warp_drive"}, "diffusers.scheduler_type"),
    ({"pipeline_type": "NotAPipeline"}, "diffusers.pipeline_type"),
    ({"default_size": "250x250"}, "diffusers.default_size"),
    ({"max_size": "big"}, "diffusers.max_size"),
])
def test_bad_config_fails_the_load_naming_the_field(config, options, field):
    from dataclasses import replace

    from workers.backends.diffusers import DiffusersBackend
    from workers.config import ModelConfigError

    with pytest.raises(ModelConfigError, match=field.replace(".", r"\.")):
        DiffusersBackend(replace(config, diffusers={**config.diffusers, **options}))
